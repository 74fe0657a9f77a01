"""The step without Lightning: chunked value-and-gradient is exact; chunk sizes; the row layout and its per-process shards; resumed chunks."""

from __future__ import annotations

import pytest
import torch

import amax_lightning.model.chunking as chunking
from amax_lightning.base.checks import check_world_size
from amax_lightning.base.errors import UserError
from amax_lightning.model.chunking import (
    _saved_bytes,
    choose_chunk_rows,
    chunk_slices,
    chunked_value_and_grad,
    saved_bytes_per_row,
    surrogate_loss,
)
from amax_lightning.optimize.objective import RowLayout, shard_bounds

SWEEP = "blocks.1.mlp.hook_post:3,17,40"  # 3 units x 2 seeds = 6 rows
SEEDS = [0, 3]


@pytest.mark.parametrize("loss_scale", [1.0, 2.0**16])
@pytest.mark.parametrize("chunk", [1, 4, 6])
def test_chunked_value_and_grad_is_the_true_loss_and_exact_gradient(tiny_module, loss_scale, chunk):
    module = tiny_module(target=SWEEP, seeds=SEEDS, priors="vocab_distance=0.5")
    objective, parameter = module.objective, module.parameter
    grad, (embedding, activations, loss) = chunked_value_and_grad(
        objective, parameter, chunk_slices(0, 6, chunk), grad_scale=2.0, loss_scale=loss_scale)
    returned = surrogate_loss(parameter, grad, loss.sum() * 2.0)
    returned.backward()
    chunked_grad = parameter.grad.clone()
    parameter.grad = None
    reference = objective(parameter, slice(0, 6))
    (reference.loss.sum() * 2.0).backward()
    torch.testing.assert_close(returned.detach(), reference.loss.sum().detach() * 2.0)
    # the same sums over other matmul shapes round differently per CPU kind: 1.3e-7 at chunk 4 on an AVX-512 Xeon
    torch.testing.assert_close(chunked_grad, parameter.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(activations, reference.activations.detach())
    assert embedding.shape == (6, 5, 64) and not loss.requires_grad


def test_chunked_value_and_grad_covers_a_shard(tiny_module):
    module = tiny_module(target=SWEEP, seeds=SEEDS)
    grad, (_, _, loss) = chunked_value_and_grad(module.objective, module.parameter, chunk_slices(2, 5, 2))
    whole = module.objective(module.parameter[2:5].detach().requires_grad_(), slice(2, 5))
    torch.testing.assert_close(loss, whole.loss.detach())
    assert grad.shape == (3, 5, 64)


def test_row_layout_names_units_seeds_and_shards():
    layout = RowLayout(n_units=3, seeds=(4, 1))
    assert layout.n_rows == 6
    assert [layout.unit_of(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [layout.seed_of(r) for r in range(6)] == [4, 1, 4, 1, 4, 1]
    assert layout.unit_rows(1) == slice(2, 4) and layout.shard == slice(0, 6)
    shards = [layout.for_process(4, rank).shard for rank in range(4)]
    assert shards == [slice(0, 2), slice(2, 4), slice(4, 5), slice(5, 6)]


def test_the_objective_runs_without_lightning_and_equals_the_backbone(tiny_module):
    module = tiny_module(target="blocks.1.mlp.hook_post:3,17", seeds=SEEDS)
    values = module.objective(module.parameter, slice(0, 4))
    hook = module.backbone.hook_values(module.parameter, module.targets[0]).detach()
    expected = torch.stack([hook[0, :, 3], hook[1, :, 3], hook[2, :, 17], hook[3, :, 17]])
    torch.testing.assert_close(values.activations.detach(), expected)
    torch.testing.assert_close(values.loss.detach(), -expected.mean(-1))


def test_saved_bytes_are_linear_in_rows_and_scale_with_depth(tiny_module):
    d, d_mlp, n_tokens = 64, 256, 5

    def loss_fn(target):
        module = tiny_module(target=target, seeds=list(range(8)))
        return lambda n: module.objective(module.parameter[:n], slice(0, n)).loss.sum()

    one_block, two_blocks = loss_fn("blocks.1.hook_resid_pre:0"), loss_fn("blocks.2.hook_resid_pre:0")
    per_row = saved_bytes_per_row(one_block)
    assert _saved_bytes(one_block, 7) - _saved_bytes(one_block, 1) == 6 * per_row  # linear in rows
    # a block must save at least its MLP hidden before and after the GELU, and holds a few dozen d-wide tensors
    assert 2 * n_tokens * d_mlp * 4 <= per_row <= 40 * n_tokens * d * 4
    assert saved_bytes_per_row(two_blocks) == pytest.approx(2 * per_row, rel=0.1)


def test_study_sized_runs_are_one_chunk(tiny_module):
    module = tiny_module(target="blocks.2.hook_resid_pre:5", seeds=list(range(10)))
    assert module.row_chunks() == [slice(0, 10)]


def test_resumed_automatic_run_keeps_its_chunks_on_the_same_device_and_world(tiny_module):
    module = tiny_module(target=SWEEP, seeds=SEEDS)
    module.chunk_rows_used = 4
    checkpoint = {"state_dict": {"parameter": module.parameter.detach()}}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["chunk_rows"] == {"rows": 4, "device": "cpu", "world_size": 1}

    def resumed(saved: dict, **options):
        other = tiny_module(target=SWEEP, seeds=SEEDS, **options)
        other.on_load_checkpoint({"chunk_rows": saved})
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


@pytest.mark.parametrize("n, world", [(10, 1), (10, 2), (10, 3), (7, 4), (4, 4)])
def test_shards_cover_seeds_in_order(n, world):
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
