"""Token search under Trainer.fit: the results schema, exact resume from a checkpoint, sweeps, TensorBoard text."""

from __future__ import annotations

import pytest
import torch

from amax_lightning.optimize.search import TokenSearch

SEARCH = {"candidates": 16, "top_k": 32, "population": 4, "seeds": [0, 1, 2]}


@pytest.mark.parametrize("method", ["gcg", "epo"])
def test_fit_writes_the_study_schema_for_searched_tokens(fit_tiny, method):
    module, results = fit_tiny(steps=6, method=method, **SEARCH)
    assert results["method"] == method and results["priors"] == []
    assert results["search"]["candidates"] == 16 and results["search"]["retokenize"] is True
    assert results["null_model"]["n_samples"] == 0  # exact: uniform over the allowed tokens
    assert results["null_model"]["expected_n_unique"] == pytest.approx(15 - 15 * 14 / 2 / 50256, abs=1e-3)
    best = TokenSearch.best(module.search_state())[1]  # EPO: the frontier's top (step 0 was a restart)
    for i, run in enumerate(results["runs"]):  # the searched tokens, their own activation, nothing lost
        assert run["decoded_gap"] == 0 and run["final_activation"] == pytest.approx(float(best[i]), rel=1e-5, abs=1e-6)
        assert run["cosine"] == pytest.approx([1.0] * 5, abs=1e-5)
        assert [near[0]["token_id"] for near in run["nearest"]] == run["token_ids"]
    history = module.activation_history()[1]
    assert history.shape == (6, 3)
    assert (history[1:] >= history[:-1]).all()  # the best sequence found so far never gets worse
    if method == "epo":
        assert [f["seed"] for f in results["pareto"]] == [0, 1, 2]
        for run, seed in zip(results["runs"], results["pareto"]):
            points = seed["frontier"]
            assert points and set(points[0]) == {"activation", "cross_entropy", "token_ids", "text"}
            assert max(p["activation"] for p in points) == pytest.approx(run["final_activation"], rel=1e-5, abs=1e-6)
            assert [p["activation"] for p in points] == sorted((p["activation"] for p in points), reverse=True)
            assert all(a["cross_entropy"] > b["cross_entropy"] for a, b in zip(points, points[1:]))
    else:
        assert "pareto" not in results


@pytest.mark.parametrize("method", ["gcg", "epo"])
def test_search_resumed_from_a_checkpoint_equals_the_uninterrupted_run(fit_tiny, tmp_path, method):
    _, whole = fit_tiny("whole", steps=8, method=method, **SEARCH)
    fit_tiny("first", steps=4, method=method, trainer_options={"enable_checkpointing": True}, **SEARCH)
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert {"parameter", "search_tokens", "search_activation"} <= set(saved)
    assert not any(key.startswith("objective.") for key in saved)  # slim: no frozen weights
    _, again = fit_tiny("resumed", steps=8, method=method, fit_options={"ckpt_path": str(checkpoint),
                                                                          "weights_only": True}, **SEARCH)
    assert again == whole


def test_gcg_sweep_matches_single_unit_runs(fit_tiny):
    _, sweep = fit_tiny("sweep", steps=4, method="gcg", target="blocks.2.hook_resid_pre:5,9", **SEARCH)
    _, single = fit_tiny("single", steps=4, method="gcg", target="blocks.2.hook_resid_pre:9", **SEARCH)
    assert [r["token_ids"] for r in sweep["units"][1]["runs"]] == [r["token_ids"] for r in single["runs"]]
    assert sweep["atlas"][1]["null_p_value"] == single["null_model"]["p_value"]
