"""Opt-in numerics: fp64 reproduces fp32, bf16 autocast stays close, TF32-style matmul precision is scoped."""

from __future__ import annotations

import json

import pytest
import torch

from amax_lightning.optimize.objective import RowObjective


def finals(results: dict) -> torch.Tensor:
    return torch.tensor([run["final_activation"] for run in results["runs"]], dtype=torch.float64)


def test_fp64_run_matches_fp32(fit_tiny):
    _, fp32 = fit_tiny("fp32", lr=1e-2)
    module, fp64 = fit_tiny("fp64", lr=1e-2, precision="64-true")
    assert module.parameter.dtype == torch.float64
    assert fp64["numerics"]["precision"] == "64-true" and fp32["numerics"]["precision"] == "32-true"
    assert [r["token_ids"] for r in fp64["runs"]] == [r["token_ids"] for r in fp32["runs"]]
    torch.testing.assert_close(finals(fp64), finals(fp32), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_fp32_parameter_and_stays_close(fit_tiny):
    _, fp32 = fit_tiny("fp32", lr=1e-2)
    module, bf16 = fit_tiny("bf16", lr=1e-2, precision="bf16-mixed")
    assert module.parameter.dtype == torch.float32  # Adam state and the learned embedding stay fp32
    assert bf16["numerics"]["precision"] == "bf16-mixed"
    relative = ((finals(bf16) - finals(fp32)).abs() / finals(fp32).abs()).max()
    assert 0 < relative < 0.05  # bf16 products really ran, and changed the optimum only slightly


def test_matmul_precision_holds_inside_steps_only_and_is_restored_after_errors(fit_tiny, monkeypatch):
    seen = []
    forward = RowObjective.forward

    def recording(self, *args):
        seen.append(torch.get_float32_matmul_precision())
        return forward(self, *args)

    monkeypatch.setattr(RowObjective, "forward", recording)
    before = torch.get_float32_matmul_precision()
    _, results = fit_tiny("high", lr=1e-2, steps=3, matmul_precision="high")
    assert results["numerics"]["matmul_precision"] == "high"
    assert seen[:3] == ["high"] * 3  # the three steps (then the end-of-fit evaluation, outside any step)
    assert torch.get_float32_matmul_precision() == before

    def failing(self, *args):
        assert torch.get_float32_matmul_precision() == "medium"
        raise RuntimeError("boom")

    monkeypatch.setattr(RowObjective, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        fit_tiny("failing", lr=1e-2, steps=3, matmul_precision="medium")
    assert torch.get_float32_matmul_precision() == before


def test_cpu_run_never_touches_cuda(tiny_gpt2_dir, tmp_path, monkeypatch):
    """Any CUDA tensor, query of device memory or stream goes through torch.cuda._lazy_init first."""

    def touched(*args, **kwargs):
        raise AssertionError("a CPU run initialized CUDA")

    monkeypatch.setattr(torch.cuda, "_lazy_init", touched)
    from amax_lightning.commands.fit import run

    writer = run(["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", "blocks.2.mlp.hook_post:0-3",
                "--seeds", "0-1", "--trainer.max_steps", "3", "--results.null_samples", "200",
                "--trainer.default_root_dir", str(tmp_path)])
    assert json.loads(open(writer.results_path).read())["numerics"]["chunk_rows"] == 8


def test_an_error_in_the_analysis_keeps_the_checkpoint_and_writes_no_results(tiny_gpt2_dir, tmp_path, monkeypatch,
                                                                             capsys):
    import amax_lightning.lightning.callbacks as callbacks
    from amax_lightning.commands.fit import run

    def broken(*args, **kwargs):
        raise RuntimeError("analysis bug")

    monkeypatch.setattr(callbacks, "with_null_model", broken)
    with pytest.raises(RuntimeError, match="analysis bug"):
        run(["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", "blocks.2.hook_resid_pre:5",
             "--seeds", "0-1", "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path),
             "--trainer.enable_progress_bar", "false"])
    assert "error in the end-of-fit analysis after step 3" in capsys.readouterr().err
    assert torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    assert not list(tmp_path.rglob("results.json"))


def test_deferred_finiteness_check_changes_nothing_for_a_good_run(fit_tiny):
    _, every_step = fit_tiny("every", steps=12)
    _, deferred = fit_tiny("deferred", steps=12, finite_check_every=5)
    assert deferred == every_step


def test_deferred_finiteness_check_names_the_step_it_went_bad_at_and_saves_no_bad_checkpoint(tiny_module, tmp_path):
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from amax_lightning.base.errors import NonFiniteError

    class BreakSeed7(Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if trainer.global_step == 3:  # the parameter after step 2's update; step 3's forward sees it
                with torch.no_grad():
                    module.parameter[1, 0, 0] = float("nan")

    module = tiny_module(seeds=[2, 7], finite_check_every=5)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = Trainer(max_steps=12, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=[BreakSeed7(), checkpoints])
    with pytest.raises(NonFiniteError, match=r"seed\(s\) \[7\] at step 3"):
        trainer.fit(module)
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=0-step=2.ckpt"]  # step 4's checkpoint found the bad step and was never written
    assert not list(tmp_path.rglob("results.json"))
