"""End to end: the real CLI in a subprocess on a tiny model; results.json, TensorBoard tags, DDP, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, TINY_TARGET, run_cli, run_in_process, sweep_view, write_sae
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RUN_KEYS = {"seed", "token_ids", "tokens", "cosine", "final_activation", "position_activations"}
TOP_KEYS = {"model", "target", "n_tokens", "steps", "lr", "runs", "uniqueness"}


def tiny_args(folder: Path, *extra: str) -> list[str]:
    return ["fit", "--model.model_name_or_path", str(folder), "--model.target", TINY_TARGET, *extra]


def results_of(proc) -> tuple[Path, dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])  # the last line printed is the results path
    assert path.name == "results.json" and path.is_file()
    return path, sweep_view(str(path), json.loads(path.read_text()))


def test_fit_seeds_writes_results_and_tensorboard(tiny_gpt2_dir, tmp_path):
    proc = run_cli(tiny_args(tiny_gpt2_dir, "--seeds", "0-2", "--trainer.max_steps", "12",
                             "--trainer.log_every_n_steps", "1", "--results.baseline_top_k", "7"), cwd=tmp_path)
    path, results = results_of(proc)
    assert path.parent.parent == tmp_path / "lightning_logs"
    assert TOP_KEYS <= results.keys()
    assert (results["target"], results["n_tokens"], results["steps"], results["lr"]) == (TINY_TARGET, 5, 12, 0.001)
    assert [r["seed"] for r in results["runs"]] == [0, 1, 2]
    for run in results["runs"]:
        assert RUN_KEYS <= run.keys()
        assert len(run["token_ids"]) == len(run["tokens"]) == len(run["cosine"]) == len(run["position_activations"]) == 5
        assert run["final_activation"] == pytest.approx(sum(run["position_activations"]) / 5)
    u = results["uniqueness"]
    all_ids = [i for r in results["runs"] for i in r["token_ids"]]
    assert u["n_total"] == 15 and u["n_unique"] == len(set(all_ids)) and sum(u["counts"]) == 15
    assert u["token_ids"] == sorted(set(all_ids)) and len(u["tokens"]) == u["n_unique"]
    assert "unique tokens" in proc.stdout and "chance (random directions decoded)" in proc.stdout
    console = proc.stdout + proc.stderr  # quiet and truthful: steps out of max_steps, no banners or tips
    assert "steps: 100%" in console and "12/12" in console and "Epoch" not in console
    assert not any(chatter in console for chatter in ("GPU available", "TPU available", "Tip:", "Warning"))
    assert results["null_model"]["n_vectors"] == 15 and 0 < results["null_model"]["p_value"] <= 1
    assert len(results["data_baseline"]["top_tokens"]["token_ids"]) == 7
    assert results["data_baseline"]["overlap"]["n_gradient"] == 15
    for name in ("report.md", "activation_curves.png", "token_frequency.png", "embedding_similarity.png",
                 "nearest_cosine.png", "activation_history.csv"):
        assert (path.parent / name).is_file(), name

    (event_file,) = path.parent.glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"activation/seed_0", "activation/seed_1", "activation/seed_2", "activation/mean", "loss",
            "embedding/norm", "embedding/vocab_norm", "uniqueness/n_unique"} <= scalars
    assert len(events.Scalars("activation/seed_2")) == 12
    assert any("decoded_tokens" in tag for tag in events.Tags()["tensors"])
    assert {"report/activation_curves", "report/embedding_similarity"} <= set(events.Tags()["images"])
    assert {"reproducibility/mean_pairwise_jaccard", "reproducibility/mean_decoded_gap"} <= scalars
    assert (path.parent / "hparams.yaml").is_file()


def test_fit_single_seed_and_config_with_overrides(tiny_gpt2_dir, tmp_path):
    one = run_cli(tiny_args(tiny_gpt2_dir, "--seed", "3", "--trainer.max_steps", "5", "--threads", "1",
                            "--results.null_samples", "1000"), cwd=tmp_path)
    _, one_results = results_of(one)
    assert one_results["numerics"]["cpu_threads"] == 1
    assert [r["seed"] for r in one_results["runs"]] == [3] and one_results["uniqueness"]["n_total"] == 5

    config = ["fit", "--config", str(REPO / "configs" / "reproduce.yaml"),
              "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", TINY_TARGET,
              "--trainer.max_steps", "5", "--trainer.accelerator", "cpu", "--results.null_samples", "1000"]
    _, study = results_of(run_cli(config, cwd=tmp_path))
    assert [r["seed"] for r in study["runs"]] == list(range(10))
    assert study["uniqueness"]["n_total"] == 50
    run_3 = next(r for r in study["runs"] if r["seed"] == 3)
    assert run_3["token_ids"] == one_results["runs"][0]["token_ids"]


def test_ddp_two_processes_equal_one(tiny_gpt2_dir, tmp_path):
    """Two processes, each running its shard (3 and 2 rows) in chunks of 2, equal one process in one batch."""
    args = tiny_args(tiny_gpt2_dir, "--seeds", "0-4", "--trainer.max_steps", "15", "--trainer.accelerator", "cpu",
                     "--model.priors", "clamp", "--results.null_samples", "2000")
    assert_ddp_equals_one_process(args, tmp_path)


def test_ddp_sae_sweep_equals_one_process(tiny_gpt2_dir, tmp_path):
    """An SAE sweep (2 latents x 2 seeds, centred residual) sharded over two processes equals one process: its
    steps, and its analysis (one block of one unit per process against one block of both)."""
    sae = write_sae(tmp_path / "sae", "pre-5")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the cat sat on mat number {i * 7}." for i in range(200)))
    args = ["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", f"sae:{sae}:3,9",
            "--seeds", "0-1", "--trainer.max_steps", "10", "--trainer.accelerator", "cpu",
            "--results.null_samples", "500", "--results.corpus", str(corpus), "--results.corpus_window", "16",
            "--results.corpus_tokens", "2000"]
    _, single = results_of(run_in_process(args, cwd=tmp_path / "single"))
    _, ddp = results_of(run_cli([*args, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                                 "--results.block_units", "1"], cwd=tmp_path / "ddp"))
    assert len(single["units"]) == len(ddp["units"]) == 2
    for a, b in zip(single["units"], ddp["units"]):
        assert a["sae"] == b["sae"] and a["sae"]["center_residual"] is True
        assert a["uniqueness"] == b["uniqueness"] and a["null_model"] == b["null_model"]
        for side in ("promoted", "suppressed"):  # the same tokens; logits from matmuls of other sizes
            assert [t["token_id"] for t in a["logit_effects"][side]] == [t["token_id"] for t in b["logit_effects"][side]]
            assert [t["logit"] for t in a["logit_effects"][side]] == pytest.approx(
                [t["logit"] for t in b["logit_effects"][side]], rel=1e-5, abs=1e-6)
        assert a["reproducibility"] == pytest.approx(b["reproducibility"], rel=1e-5, abs=1e-6)
        assert [r["token_ids"] for r in a["runs"]] == [r["token_ids"] for r in b["runs"]]
        for ra, rb in zip(a["runs"], b["runs"]):
            assert ra["position_activations"] == pytest.approx(rb["position_activations"], rel=1e-5, abs=1e-6)
        # the corpus pass: each process read the corpus for its own block's unit
        assert a["corpus"]["n_tokens"] == b["corpus"]["n_tokens"] > 0 and a["corpus"]["histogram"] == b["corpus"]["histogram"]
        assert len(a["corpus"]["top_examples"]) == len(b["corpus"]["top_examples"]) == 20
        assert len(a["corpus"]["quantiles"]) == len(b["corpus"]["quantiles"])
        for ea, eb in zip(a["corpus"]["top_examples"], b["corpus"]["top_examples"]):
            assert (ea["token_ids"], ea["position"]) == (eb["token_ids"], eb["position"])
            assert ea["activations"] == pytest.approx(eb["activations"], rel=1e-5, abs=1e-6)
        assert [[e["token_ids"] for e in g["examples"]] for g in a["corpus"]["quantiles"]] == \
            [[e["token_ids"] for e in g["examples"]] for g in b["corpus"]["quantiles"]]


def test_ddp_token_search_equals_one_process(tiny_gpt2_dir, tmp_path):
    """EPO over 5 seeds sharded 3 + 2 over two processes (chunks of 2) equals one process, Pareto frontiers too."""
    args = tiny_args(tiny_gpt2_dir, "--seeds", "0-4", "--trainer.max_steps", "6", "--trainer.accelerator", "cpu",
                     "--model.method", "epo", "--model.candidates", "8", "--model.top_k", "16", "--model.population",
                     "2", "--results.null_samples", "100", "--trainer.log_every_n_steps", "3")
    single, ddp = assert_ddp_equals_one_process(args, tmp_path)
    assert ddp["method"] == "epo"
    for a, b in zip(single["pareto"], ddp["pareto"]):  # the same points; values to float rounding (other chunks)
        assert a["seed"] == b["seed"] and [p["token_ids"] for p in a["frontier"]] == [p["token_ids"] for p in b["frontier"]]
        for p, q in zip(a["frontier"], b["frontier"]):
            assert (p["activation"], p["cross_entropy"]) == pytest.approx((q["activation"], q["cross_entropy"]), rel=1e-5)
    (folder,) = (tmp_path / "single" / "lightning_logs").glob("version_*")
    assert (folder / "pareto.png").is_file() and "pareto.png" in (folder / "report.md").read_text()
    (event_file,) = folder.glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert any("search/best_sequences" in tag for tag in events.Tags()["tensors"])
    assert len(events.Scalars("activation/seed_4")) == 2 and "report/pareto" in events.Tags()["images"]


def assert_ddp_equals_one_process(args: list[str], tmp_path: Path) -> None:
    """Two DDP processes (a subprocess) equal one process (run in this process)."""
    _, single = results_of(run_in_process(args, cwd=tmp_path / "single"))
    _, ddp = results_of(run_cli([*args, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.chunk_rows", "2"],
                                cwd=tmp_path / "ddp"))
    assert ddp["numerics"]["chunk_rows"] == 2 and single["numerics"]["chunk_rows"] == 5
    assert len(list((tmp_path / "ddp").rglob("results.json"))) == 1
    assert ddp["uniqueness"] == single["uniqueness"] and ddp["null_model"] == single["null_model"]
    for key in ("position_agreement", "mean_pairwise_jaccard"):
        assert ddp["reproducibility"][key] == single["reproducibility"][key]
    for key in ("mean_pairwise_cosine", "mean_nearest_cosine", "mean_decoded_gap"):
        assert ddp["reproducibility"][key] == pytest.approx(single["reproducibility"][key], rel=1e-5, abs=1e-6)
    for a, b in zip(single["runs"], ddp["runs"]):
        assert (a["seed"], a["token_ids"]) == (b["seed"], b["token_ids"])
        assert a["position_activations"] == pytest.approx(b["position_activations"], rel=1e-5, abs=1e-6)
        assert a["cosine"] == pytest.approx(b["cosine"], rel=1e-5, abs=1e-6)
    # the snapshots: every process decodes its own shard at the same steps; the same numbers, the same verdict
    one, two = single["convergence"], ddp["convergence"]
    assert {k: v for k, v in one.items() if k != "snapshots"} == {k: v for k, v in two.items() if k != "snapshots"}
    for a, b in zip(one["snapshots"], two["snapshots"], strict=True):
        assert (a["step"], a["n_unique"], a["changed_fraction"]) == (b["step"], b["n_unique"], b["changed_fraction"])
        assert a["mean_objective"] == pytest.approx(b["mean_objective"], rel=1e-5, abs=1e-6)
    return single, ddp


# The full table of bad input runs in process (test_hostile_input.py); these few check the real subprocess path.
BAD_INPUT = [  # (bad targets, seeds, models: test_hostile_input.py, in process)
    (["--seeds", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"], "1 run(s) (units x seeds) for 2 processes"),
    (["--no-such-flag", "1"], "unrecognized arguments"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUT, ids=[m for _, m in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_gpt2_dir, tmp_path, extra, message):
    proc = run_cli([*tiny_args(tiny_gpt2_dir), "--trainer.max_steps", "2", *extra], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("amax_lightning: error: ") and message in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
