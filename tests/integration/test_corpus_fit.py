"""The corpus pass through a whole fit, against an independent loop over HF ``output_hidden_states``: top windows and
their per-token activations, density, histogram, quantile groups and samples; an SAE sweep per latent against the
SAE formula and against the latent run alone; the hub path offline from a locally cached dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO, write_sae
from safetensors.torch import load_file
from transformers import AutoModel

from amax_lightning.analysis.corpus_stats import sample_keys

HOSTILE = ["<script>alert('x')</script> & <b>bold</b>", "nul \u0000 here", "rtl \u202e reversed \u202c end", "",
           "a very long line " * 400]
WINDOW, BUDGET = 16, 6_400


@pytest.fixture(scope="module")
def documents() -> list[str]:
    paragraphs = [p.strip() for p in (REPO / "README.md").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return HOSTILE[:3] + paragraphs[:60] + HOSTILE[3:]


@pytest.fixture(scope="module")
def corpus(documents, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(documents)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf(tiny_gpt2_dir):
    return AutoModel.from_pretrained(tiny_gpt2_dir).eval()


def reference_windows(tokenizer, documents: list[str]) -> torch.Tensor:
    """The windows by hand: each document's tokens then <|endoftext|>, cut into [BOS] + 15 tokens."""
    stream = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            stream += ids + [tokenizer.eos_token_id]
    body = WINDOW - 1
    n = min(len(stream) // body, BUDGET // WINDOW)
    return torch.tensor([[tokenizer.bos_token_id] + stream[i * body : (i + 1) * body] for i in range(n)])


def reference_stats(windows: torch.Tensor, values: torch.Tensor, unit_id: int, result: dict) -> None:
    """Check a unit's corpus record against its activations (windows, WINDOW) at the token ids ``windows``, computed
    independently."""
    counted = values[:, 1:].double()
    n_tokens = counted.numel()
    assert result["n_tokens"] == n_tokens and result["n_windows"] == len(values) and result["bos_excluded"]
    assert result["density"] == pytest.approx(float((counted > 0).double().mean()), abs=1e-12)
    assert result["max"] == pytest.approx(float(counted.max()), rel=1e-5, abs=1e-6)
    window_max = counted.amax(dim=1)
    order = sorted(range(len(values)), key=lambda w: (-float(window_max[w]), w))[:20]
    got = result["top_examples"]
    assert len(got) == 20
    for example, w in zip(got, order):
        assert example["max"] == pytest.approx(float(window_max[w]), rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(example["activations"], values[w].numpy(), rtol=1e-5, atol=1e-5)
        assert example["token_ids"] == windows[w].tolist()
        assert example["position"] == int(counted[w].argmax()) + 1
    active = counted[counted > 0].numpy()
    groups = result["quantiles"]
    if len(active) == 0:  # a unit real text never drives above 0
        assert result["histogram"] == {"edges": [], "counts": []} and groups == []
        return
    edges = np.asarray(result["histogram"]["edges"])
    assert np.histogram(active, bins=edges)[0].tolist() == result["histogram"]["counts"]
    assert sum(result["histogram"]["counts"]) == len(active) and edges[0] <= active.min() and edges[-1] > active.max()
    assert 1 <= len(groups) <= 10
    assert sum(g["fraction"] for g in groups) == pytest.approx(result["density"], abs=1e-12)
    token_index = torch.arange(values.numel()).reshape(values.shape)[:, 1:]
    keys = sample_keys(token_index.reshape(-1), torch.full((token_index.numel(),), unit_id)).reshape(token_index.shape)
    for group in groups:
        inside = (counted >= group["low"]) & (counted < group["high"]) & (counted > 0)
        assert group["fraction"] == pytest.approx(float(inside.sum()) / n_tokens, abs=1e-12)
        chosen = torch.sort(torch.where(inside, keys, -1.0).reshape(-1), descending=True)
        picked = [int(token_index.reshape(-1)[i]) for k, i in zip(chosen.values[:5], chosen.indices[:5]) if k >= 0]
        assert [e["position"] for e in group["examples"]] == [t % WINDOW for t in picked]
        assert [e["activations"][e["position"]] for e in group["examples"]] == pytest.approx(
            [float(values.reshape(-1)[t]) for t in picked], rel=1e-5, abs=1e-6)
        for example, t in zip(group["examples"], picked):
            assert example["token_ids"] == windows[t // WINDOW].tolist()


def test_one_unit_corpus_pass_equals_a_loop_over_hf_hidden_states(fit_tiny, hf, corpus, documents, tiny_backbone):
    module, results = fit_tiny(steps=5, writer_options={"corpus": str(corpus), "corpus_column": "body",
                                                        "corpus_tokens": BUDGET, "corpus_window": WINDOW})
    windows = reference_windows(tiny_backbone.tokenizer, documents)
    with torch.no_grad():
        values = hf(input_ids=windows, output_hidden_states=True).hidden_states[2][..., 5]  # TINY_TARGET
    got = results["corpus"]
    assert got["source"] == str(corpus) and got["window"] == WINDOW and got["density_threshold"] == 0.0
    reference_stats(windows, values, 5, got)
    comparison = got["comparison"]
    assert comparison["corpus_max"] == got["max"]
    best = max(a for run in results["runs"] for a in run["position_activations"])
    assert comparison["optimized_max_token"] == pytest.approx(best)
    assert comparison["optimized_over_corpus_max"] == pytest.approx(best / got["max"])
    decoded = {i for run in results["runs"] for i in run["token_ids"]}
    assert comparison["shared_token_ids"] == sorted(decoded & set(got["top_token_ids"]))
    assert [e["tokens"] for e in got["top_examples"]][0] == tiny_backbone.token_strings(got["top_examples"][0]["token_ids"])


def test_sae_sweep_corpus_equals_the_formula_and_each_latent_alone(fit_tiny, hf, corpus, documents, tiny_backbone,
                                                                   tmp_path):
    folder = write_sae(tmp_path / "sae", "6.x")
    options = {"corpus": str(corpus), "corpus_column": "body", "corpus_tokens": BUDGET, "corpus_window": WINDOW,
               "block_units": 2}
    _, sweep = fit_tiny("sweep", target=f"sae:{folder}:3,9,17", seeds=[0, 1], steps=3, writer_options=options)
    _, alone = fit_tiny("alone", target=f"sae:{folder}:9", seeds=[0, 1], steps=3, writer_options=options)
    windows = reference_windows(tiny_backbone.tokenizer, documents)
    weights = load_file(str(folder / "sae_weights.safetensors"))
    with torch.no_grad():
        x = hf(input_ids=windows, output_hidden_states=True).hidden_states[1]
        latents = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]  # hook_sae_acts_pre
    fired = []
    for unit, latent in zip(sweep["units"], (3, 9, 17)):
        reference_stats(windows, latents[..., latent], latent, unit["corpus"])
        fired.append(unit["corpus"]["density"] > 0)
    assert fired == [False, True, True]  # one latent never fires on this text: an empty histogram, no groups
    one, other = sweep["units"][1]["corpus"], alone["corpus"]
    assert [e["token_ids"] for e in one["top_examples"]] == [e["token_ids"] for e in other["top_examples"]]
    assert one["histogram"] == other["histogram"] and one["density"] == other["density"]
    assert [[(e["token_ids"], e["position"]) for e in g["examples"]] for g in one["quantiles"]] == \
        [[(e["token_ids"], e["position"]) for e in g["examples"]] for g in other["quantiles"]]
    atlas = {row["unit"]: row for row in sweep["atlas"]}
    assert atlas[1]["corpus_max"] == pytest.approx(one["max"]) and atlas[1]["corpus_density"] == one["density"]
    mine, theirs = one["comparison"], other["comparison"]  # unit_record rebuilds the one-unit comparison
    assert mine["shared_token_ids"] == theirs["shared_token_ids"] and mine["shared_tokens"] == theirs["shared_tokens"]
    for key in ("optimized_objective", "optimized_max_token", "decoded_objective", "corpus_max",
                "optimized_over_corpus_max"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert atlas[1]["optimized_over_corpus_max"] == pytest.approx(mine["optimized_over_corpus_max"], rel=1e-6)


def test_a_sweep_too_wide_for_one_pass_reads_the_corpus_per_group_with_the_same_results(fit_tiny, corpus, monkeypatch,
                                                                                         capsys):
    """When one pass over all units would not fit in half the free memory, the sweep reads the corpus once per group
    of blocks (here one block of 2 units a pass) and each unit's corpus results are those of one pass."""
    from amax_lightning.analysis.corpus_pass import pass_bytes
    from amax_lightning.lightning import callbacks

    options = {"corpus": str(corpus), "corpus_column": "body", "corpus_tokens": BUDGET, "corpus_window": WINDOW,
               "block_units": 2}
    _, whole = fit_tiny("whole", target="blocks.2.hook_resid_pre:0-5", seeds=[0], steps=2, writer_options=options)
    monkeypatch.setattr(callbacks, "free_memory_bytes", lambda device: 2 * pass_bytes(2, WINDOW, BUDGET) + 1)
    passes = []
    real_pass = callbacks.corpus_pass
    monkeypatch.setattr(callbacks, "corpus_pass", lambda *args, **kw: passes.append(len(args[4])) or real_pass(*args, **kw))
    capsys.readouterr()
    _, grouped = fit_tiny("grouped", target="blocks.2.hook_resid_pre:0-5", seeds=[0], steps=2, writer_options=options)
    assert "6 unit(s) in 3 passes of up to 2 units (half the free memory)" in capsys.readouterr().err
    assert passes == [2, 2, 2]  # the units read by each pass
    for a, b in zip(whole["units"], grouped["units"]):
        one, other = a["corpus"], b["corpus"]
        assert one["histogram"] == other["histogram"] and one["density"] == other["density"]
        assert [(e["token_ids"], e["position"]) for e in one["top_examples"]] == \
            [(e["token_ids"], e["position"]) for e in other["top_examples"]]
        assert [[(e["token_ids"], e["position"]) for e in g["examples"]] for g in one["quantiles"]] == \
            [[(e["token_ids"], e["position"]) for e in g["examples"]] for g in other["quantiles"]]
        np.testing.assert_allclose([e["activations"] for e in one["top_examples"]],
                                   [e["activations"] for e in other["top_examples"]], rtol=1e-5, atol=1e-6)


def test_mlp_neuron_sweep_corpus_equals_hf_mlp_activations(fit_tiny, hf, corpus, documents, tiny_backbone):
    """MLP neurons (``blocks.1.mlp.hook_post``) against HF's own GELU output, captured with a forward hook."""
    options = {"corpus": str(corpus), "corpus_column": "body", "corpus_tokens": BUDGET, "corpus_window": WINDOW}
    _, sweep = fit_tiny("mlp", target="blocks.1.mlp.hook_post:7,100,255", seeds=[0], steps=2, writer_options=options)
    windows = reference_windows(tiny_backbone.tokenizer, documents)
    captured = []
    handle = hf.h[1].mlp.act.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            hf(input_ids=windows)
    finally:
        handle.remove()
    for unit, neuron in zip(sweep["units"], (7, 100, 255)):
        reference_stats(windows, captured[0][..., neuron], neuron, unit["corpus"])
