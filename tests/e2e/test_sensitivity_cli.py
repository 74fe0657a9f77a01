"""The sensitivity command as users run it: two DDP processes (a subprocess) give the answer of one process."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TARGET, run_cli, run_in_process

CONFIG = f"targets: [{TINY_TARGET}]\nseeds: 0-2\nsizes: [0, 1.0e-5, 0.1]\nreplicas: 2\nsnapshots: [5, 10]\nnumerics: []\n"


def sensitivity(folder, cwd, *extra, run=run_cli):
    cwd.mkdir(parents=True)
    (cwd / "s.yaml").write_text(CONFIG)
    proc = run(["sensitivity", "--config", "s.yaml", "--model.model_name_or_path", str(folder),
                    "--trainer.accelerator", "cpu", "--model.lr", "0.01", *extra], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "sensitivity/version_0/sensitivity.md"
    assert len(list(cwd.glob("sensitivity/version_*"))) == 1
    return json.loads((cwd / "sensitivity/version_0/sensitivity.json").read_text())["targets"][0]


def test_sensitivity_ddp_two_processes_equal_one(tiny_gpt2_dir, tmp_path):
    single = sensitivity(tiny_gpt2_dir, tmp_path / "single", run=run_in_process)
    ddp = sensitivity(tiny_gpt2_dir, tmp_path / "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert ddp["verdict"] == single["verdict"] and ddp["seeds"] == single["seeds"]
    for a, b in zip(single["snapshots"], ddp["snapshots"]):
        assert a["step"] == b["step"]
        for x, y in zip(a["sizes"], b["sizes"]):
            assert x["replica_token_agreement"] == y["replica_token_agreement"]
            assert x["replica_distance"] == pytest.approx(y["replica_distance"], rel=1e-4, abs=1e-9)
        assert a["seeds"]["token_agreement"] == b["seeds"]["token_agreement"]
    for a, b in zip(single["distance_curves"]["mean_relative_distance"], ddp["distance_curves"]["mean_relative_distance"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-9)
    assert ddp["numerics"]["precision"] == "32-true"

