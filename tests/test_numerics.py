"""Opt-in numerics: fp64 reproduces fp32, bf16 autocast stays close, TF32-style matmul precision is scoped."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer

from amax_lightning.callbacks import ResultsWriter
from amax_lightning.module import ActMaxModule
from conftest import TINY_TARGET

SEEDS = [0, 1, 2]


def fit(folder, tmp_path, precision: str = "32-true", steps: int = 20, **options) -> tuple[ActMaxModule, dict]:
    module = ActMaxModule(model_name_or_path=str(folder), target=TINY_TARGET, seeds=SEEDS, lr=1e-2, **options)
    trainer = Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[ResultsWriter(null_samples=200)])
    trainer.fit(module)
    with open(tmp_path / "results.json") as handle:
        return module, json.load(handle)


def finals(results: dict) -> torch.Tensor:
    return torch.tensor([run["final_activation"] for run in results["runs"]], dtype=torch.float64)


def test_fp64_run_matches_fp32(tiny_gpt2_dir, tmp_path):
    _, fp32 = fit(tiny_gpt2_dir, tmp_path / "fp32")
    module, fp64 = fit(tiny_gpt2_dir, tmp_path / "fp64", precision="64-true")
    assert module.parameter.dtype == torch.float64
    assert fp64["numerics"]["precision"] == "64-true" and fp32["numerics"]["precision"] == "32-true"
    assert [r["token_ids"] for r in fp64["runs"]] == [r["token_ids"] for r in fp32["runs"]]
    torch.testing.assert_close(finals(fp64), finals(fp32), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_fp32_parameter_and_stays_close(tiny_gpt2_dir, tmp_path):
    _, fp32 = fit(tiny_gpt2_dir, tmp_path / "fp32")
    module, bf16 = fit(tiny_gpt2_dir, tmp_path / "bf16", precision="bf16-mixed")
    assert module.parameter.dtype == torch.float32  # Adam state and the learned embedding stay fp32
    assert bf16["numerics"]["precision"] == "bf16-mixed"
    relative = ((finals(bf16) - finals(fp32)).abs() / finals(fp32).abs()).max()
    assert 0 < relative < 0.05  # bf16 products really ran, and changed the optimum only slightly


def test_matmul_precision_holds_inside_steps_only_and_is_restored_after_errors(tiny_gpt2_dir, tmp_path, monkeypatch):
    seen = []
    forward = ActMaxModule._forward_rows

    def recording(self, *args):
        seen.append(torch.get_float32_matmul_precision())
        return forward(self, *args)

    monkeypatch.setattr(ActMaxModule, "_forward_rows", recording)
    before = torch.get_float32_matmul_precision()
    _, results = fit(tiny_gpt2_dir, tmp_path / "high", steps=3, matmul_precision="high")
    assert results["numerics"]["matmul_precision"] == "high"
    assert seen[:3] == ["high"] * 3  # the three steps (then the end-of-fit evaluation, outside any step)
    assert torch.get_float32_matmul_precision() == before

    def failing(self, *args):
        assert torch.get_float32_matmul_precision() == "medium"
        raise RuntimeError("boom")

    monkeypatch.setattr(ActMaxModule, "_forward_rows", failing)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tiny_gpt2_dir, tmp_path / "failing", steps=3, matmul_precision="medium")
    assert torch.get_float32_matmul_precision() == before


def test_compiled_step_matches_eager(tiny_gpt2_dir, tmp_path):
    eager, eager_results = fit(tiny_gpt2_dir, tmp_path / "eager", steps=6)
    compiled, compiled_results = fit(tiny_gpt2_dir, tmp_path / "compiled", steps=6, compile_mode="default")
    assert compiled_results["numerics"]["compile_mode"] == "default"
    assert compiled._compiled_forward is not compiled._forward_rows  # really went through torch.compile
    torch.testing.assert_close(compiled.parameter.detach(), eager.parameter.detach(), rtol=1e-5, atol=1e-6)
    assert [r["token_ids"] for r in compiled_results["runs"]] == [r["token_ids"] for r in eager_results["runs"]]


def test_cpu_run_never_touches_cuda(tiny_gpt2_dir, tmp_path, monkeypatch):
    """Any CUDA tensor, query of device memory or stream goes through torch.cuda._lazy_init first."""

    def touched(*args, **kwargs):
        raise AssertionError("a CPU run initialized CUDA")

    monkeypatch.setattr(torch.cuda, "_lazy_init", touched)
    from amax_lightning.cli import run

    path = run(["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", "blocks.2.mlp.hook_post:0-3",
                "--seeds", "0-1", "--trainer.max_steps", "3", "--results.null_samples", "200",
                "--trainer.default_root_dir", str(tmp_path)])
    assert json.loads(open(path).read())["units"][0]["numerics"]["chunk_rows"] == 8
