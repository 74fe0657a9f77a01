"""Chunked steps: rows run in chunks give the same optimization as one batch; chunk sizes follow measured memory."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer

import amax_lightning.chunking as chunking
import amax_lightning.module as module_lib
from amax_lightning.callbacks import ResultsWriter
from amax_lightning.chunking import _saved_bytes, choose_chunk_rows, chunk_slices, saved_bytes_per_row
from amax_lightning.errors import UserError
from amax_lightning.module import ActMaxModule, check_world_size

SWEEP = "blocks.1.mlp.hook_post:3,17,40"  # 3 units x 2 seeds = 6 rows
SEEDS = [0, 3]


def fit(folder, tmp_path, chunk_rows: int, steps: int = 12, priors: str = "") -> tuple[ActMaxModule, dict]:
    module = ActMaxModule(model_name_or_path=str(folder), target=SWEEP, seeds=SEEDS, lr=1e-2, chunk_rows=chunk_rows,
                          priors=priors)
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[ResultsWriter(null_samples=200)])
    trainer.fit(module)
    with open(tmp_path / "results.json") as handle:
        return module, json.load(handle)


@pytest.mark.parametrize("chunk_rows", [1, 4])
def test_chunked_steps_equal_one_batch(tiny_gpt2_dir, tmp_path, chunk_rows):
    whole, whole_results = fit(tiny_gpt2_dir, tmp_path / "whole", chunk_rows=6)
    chunked, chunked_results = fit(tiny_gpt2_dir, tmp_path / "chunked", chunk_rows=chunk_rows)
    assert whole.chunk_rows_used == 6 and chunked.chunk_rows_used == chunk_rows
    torch.testing.assert_close(chunked.parameter.detach(), whole.parameter.detach(), rtol=1e-5, atol=1e-6)
    _, whole_history = whole.activation_history()
    _, chunked_history = chunked.activation_history()
    torch.testing.assert_close(chunked_history, whole_history, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole_results["units"], chunked_results["units"]):
        assert [r["token_ids"] for r in a["runs"]] == [r["token_ids"] for r in b["runs"]]
        assert a["uniqueness"] == b["uniqueness"]


def test_chunked_steps_keep_prior_penalties(tiny_gpt2_dir, tmp_path):
    priors = "vocab_distance=0.5,clamp"
    whole, _ = fit(tiny_gpt2_dir, tmp_path / "whole", chunk_rows=6, steps=6, priors=priors)
    chunked, _ = fit(tiny_gpt2_dir, tmp_path / "chunked", chunk_rows=4, steps=6, priors=priors)
    torch.testing.assert_close(chunked.parameter.detach(), whole.parameter.detach(), rtol=1e-5, atol=1e-6)


class _LoopState:  # the Trainer attributes training_step reads
    world_size, log_every_n_steps, global_step = 1, 10**9, 0

    def __init__(self, loss_scale: float | None = None):
        if loss_scale is not None:  # a 16-mixed run's GradScaler
            scaler = type("Scaler", (), {"get_scale": lambda self: loss_scale, "is_enabled": lambda self: True})()
            self.precision_plugin = type("Plugin", (), {"scaler": scaler})()


@pytest.mark.parametrize("loss_scale", [None, 2.0**16])
def test_chunked_step_returns_the_true_loss_and_exact_gradient(tiny_gpt2_dir, loss_scale):
    module = ActMaxModule(model_name_or_path=str(tiny_gpt2_dir), target=SWEEP, seeds=SEEDS, chunk_rows=4)
    module._trainer = _LoopState(loss_scale)
    module.log_dict = module.log = lambda *a, **k: None
    returned = module.training_step(None, 0)
    returned.backward()
    chunked_grad = module.parameter.grad.clone()
    module.parameter.grad = None
    _, _, loss = module.row_forward(module.parameter, slice(0, 6))
    loss.sum().backward()
    torch.testing.assert_close(returned.detach(), loss.sum().detach())
    torch.testing.assert_close(chunked_grad, module.parameter.grad, rtol=1e-6, atol=1e-7)
    module._trainer = None


def test_saved_bytes_are_linear_in_rows_and_scale_with_depth(tiny_gpt2_dir):
    d, d_mlp, n_tokens = 64, 256, 5

    def loss_fn(target):
        module = ActMaxModule(model_name_or_path=str(tiny_gpt2_dir), target=target, seeds=list(range(8)))
        return lambda n: module.row_forward(module.parameter[:n], slice(0, n))[2].sum()

    one_block, two_blocks = loss_fn("blocks.1.hook_resid_pre:0"), loss_fn("blocks.2.hook_resid_pre:0")
    per_row = saved_bytes_per_row(one_block)
    assert _saved_bytes(one_block, 7) - _saved_bytes(one_block, 1) == 6 * per_row  # linear in rows
    # a block must save at least its MLP hidden before and after the GELU, and holds a few dozen d-wide tensors
    assert 2 * n_tokens * d_mlp * 4 <= per_row <= 40 * n_tokens * d * 4
    assert saved_bytes_per_row(two_blocks) == pytest.approx(2 * per_row, rel=0.1)


def test_automatic_chunks_follow_free_memory(tiny_gpt2_dir, tmp_path, monkeypatch, caplog):
    probe = ActMaxModule(model_name_or_path=str(tiny_gpt2_dir), target=SWEEP, seeds=SEEDS)
    per_row = saved_bytes_per_row(lambda n: probe.row_forward(probe.parameter[:n], slice(0, n))[2].sum())
    monkeypatch.setattr(module_lib, "free_memory_bytes", lambda device: 2 * 2 * per_row)  # half of it: 2 rows
    module, results = fit(tiny_gpt2_dir, tmp_path / "auto", chunk_rows=0, steps=3)
    assert module.chunk_rows_used == 2
    assert "running 6 rows as 3 chunks of 2 rows" in caplog.text
    assert results["units"][0]["numerics"]["chunk_rows"] == 2

    monkeypatch.setattr(module_lib, "free_memory_bytes", lambda device: None)  # unknown: one chunk
    module, _ = fit(tiny_gpt2_dir, tmp_path / "unknown", chunk_rows=0, steps=1)
    assert module.chunk_rows_used == 6

    monkeypatch.setattr(chunking, "CPU_CHUNK_TOKENS", 3 * 5)  # on CPU: at most the fastest chunk, 3 rows of 5 tokens
    module, _ = fit(tiny_gpt2_dir, tmp_path / "fastest", chunk_rows=0, steps=1)
    assert module.chunk_rows_used == 3


def test_study_sized_runs_are_one_chunk(tiny_gpt2_dir, tmp_path):
    module = ActMaxModule(model_name_or_path=str(tiny_gpt2_dir), target="blocks.2.hook_resid_pre:5")
    module.shard = (0, module.n_rows)
    assert module.row_chunks() == [slice(0, 10)]


def test_resumed_automatic_run_keeps_its_chunks_on_the_same_device_and_world(tiny_gpt2_dir):
    module = ActMaxModule(model_name_or_path=str(tiny_gpt2_dir), target=SWEEP, seeds=SEEDS)
    module.chunk_rows_used = 4
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["chunk_rows"] == {"rows": 4, "device": "cpu", "world_size": 1}

    def resumed(saved: dict, **options) -> ActMaxModule:
        other = ActMaxModule(model_name_or_path=str(tiny_gpt2_dir), target=SWEEP, seeds=SEEDS, **options)
        other.on_load_checkpoint({"chunk_rows": saved})
        other.shard = (0, other.n_rows)
        other.row_chunks()
        return other

    assert resumed(checkpoint["chunk_rows"]).chunk_rows_used == 4
    assert resumed(checkpoint["chunk_rows"], chunk_rows=3).chunk_rows_used == 3  # an explicit choice wins
    moved = {**checkpoint["chunk_rows"], "device": "cuda"}  # chosen for another device: measured again here
    assert resumed(moved).chunk_rows_used == 6


@pytest.mark.parametrize(
    "rows, per_row, free, cap, expected",
    [(100, 10, None, None, 100), (100, 10, 10_000, None, 100), (100, 10, 1_000, None, 50), (100, 10, 5, None, 1),
     (7, 1, 10**12, None, 7), (100, 10, None, 30, 30), (100, 10, 1_000, 30, 30), (100, 10, 400, 30, 20)],
)
def test_choose_chunk_rows(rows, per_row, free, cap, expected):
    assert choose_chunk_rows(rows, per_row, free, cap) == expected


def test_fastest_chunk_is_a_cpu_rule():
    assert chunking.fastest_chunk_rows(torch.device("cpu"), 5) == chunking.CPU_CHUNK_TOKENS // 5
    assert chunking.fastest_chunk_rows(torch.device("cpu"), 10**6) == 1
    assert chunking.fastest_chunk_rows(torch.device("meta"), 5) is None


def test_every_process_needs_a_row():
    with pytest.raises(UserError, match="3 run\\(s\\) \\(units x seeds\\) for 4 processes"):
        check_world_size(3, 4)
    check_world_size(4, 4)


def test_chunk_slices_cover_rows_in_order():
    assert chunk_slices(3, 10, 3) == [slice(3, 6), slice(6, 9), slice(9, 10)]
    assert chunk_slices(0, 4, 10) == [slice(0, 4)]
