"""The study command: every target x variant runs, the table is right, bad study files are one-line errors."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import REPO, write_sae

from amax_lightning.__main__ import main

STUDY = """
targets: [blocks.2.hook_resid_pre:5, blocks.1.mlp.hook_post:7]
variants:
  - {}
  - {model.priors: straight_through}
  - {model.method: gcg, model.candidates: 8, model.top_k: 16}
"""


def test_study_runs_every_target_and_variant(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.yaml").write_text(STUDY)
    main(["study", "--config", "study.yaml", "--model.model_name_or_path", str(tiny_gpt2_dir), "--seeds", "0-1",
          "--trainer.max_steps", "3", "--trainer.accelerator", "cpu", "--results.null_samples", "500"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "studies/version_0/study.md"
    with open(tmp_path / "studies/version_0/study.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["target"], r["variant"]) for r in rows] == [
        ("blocks.2.hook_resid_pre:5", "none"), ("blocks.2.hook_resid_pre:5", "priors=straight_through"),
        ("blocks.2.hook_resid_pre:5", "method=gcg candidates=8 top_k=16"),
        ("blocks.1.mlp.hook_post:7", "none"), ("blocks.1.mlp.hook_post:7", "priors=straight_through"),
        ("blocks.1.mlp.hook_post:7", "method=gcg candidates=8 top_k=16")]
    for row in rows:
        results = json.loads((tmp_path / row["results"]).read_text())
        assert results["target"] == row["target"] and int(row["n_unique"]) == results["uniqueness"]["n_unique"]
        assert float(row["null_p_value"]) == results["null_model"]["p_value"]
        decoded = [run["decoded_activation"] for run in results["runs"]]
        assert float(row["mean_token_activation"]) == pytest.approx(sum(decoded) / len(decoded))
    assert float(rows[1]["mean_decoded_gap"]) == 0.0  # straight-through optimizes real tokens
    gcg = json.loads((tmp_path / rows[2]["results"]).read_text())
    assert gcg["method"] == "gcg" and float(rows[2]["mean_decoded_gap"]) == 0.0


def test_shipped_study_config_is_valid():
    from amax_lightning.commands.study import load_study

    for name in ("priors_study.yaml", "methods_study.yaml"):
        study = load_study(str(REPO / "configs" / name))
        assert study["fit_config"].endswith("reproduce.yaml") and len(study["targets"]) >= 2
    methods = load_study(str(REPO / "configs" / "methods_study.yaml"))["variants"]
    assert {v.get("model.method", "continuous") for v in methods} == {"continuous", "gcg", "epo"}


def test_token_search_config_builds_a_module(tiny_gpt2_dir, tiny_backbone):
    import yaml

    from amax_lightning.lightning.module import ActMaxModule

    config = yaml.safe_load((REPO / "configs" / "token_search.yaml").read_text())
    options = {**config["model"], "model_name_or_path": str(tiny_gpt2_dir), "target": "blocks.2.hook_resid_pre:5"}
    module = ActMaxModule(**options, seeds=config["seeds"], backbone=tiny_backbone)
    assert module.method == "gcg" and module.protocol().search["top_k"] == 256 and module.n_rows == 10


@pytest.mark.parametrize(
    "text, extra, message",
    [("targets: []\n", [], "targets must be a non-empty list"),
     ("targets: [a]\nvariants: [1]\n", [], "variants must be a non-empty list of mappings"),
     ("targets: [a]\nnope: 1\n", [], "unknown keys ['nope']"),
     ("targets: [a\n", [], "not valid YAML"),
     ("- 1\n", [], "must be a mapping"),
     ("targets: [a]\nfit_config: missing.yaml\n", [], "is not a file"),
     ("targets: [blocks.1.hook_resid_pre:0]\n", ["--model.target", "x"], "cannot be passed to study"),
     ("targets: [blocks.9.hook_resid_pre:0]\n", [], "target layer 9 is out of range")],
)
def test_bad_study_files(tiny_gpt2_dir, tmp_path, monkeypatch, capsys, text, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--config", "study.yaml", "--model.model_name_or_path", str(tiny_gpt2_dir), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.strip().splitlines()[-1].startswith("amax_lightning: error: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_shipped_sae_study_config_is_valid():
    from amax_lightning.commands.study import load_study

    study = load_study(str(REPO / "configs" / "sae_study.yaml"))
    assert study["targets"][1].endswith(":top8@91")


def test_study_of_an_sae_sweep_has_a_row_per_latent(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sae = write_sae(tmp_path / "sae", "6.x")
    (tmp_path / "study.yaml").write_text(f"targets: [blocks.1.hook_resid_pre:5, 'sae:{sae}:top2@5']\n")
    main(["study", "--config", "study.yaml", "--model.model_name_or_path", str(tiny_gpt2_dir), "--seeds", "0-1",
          "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--results.null_samples", "100"])
    with open(tmp_path / "studies/version_0/study.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["target"].split(":")[0] for r in rows] == ["blocks.1.hook_resid_pre", "sae", "sae"]
