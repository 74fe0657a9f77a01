"""Streaming corpus statistics against brute force: top windows, density, the exact doubling histogram, and the
hashed-key samples of each quantile group, whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amax_lightning.analysis.corpus_stats import CorpusStats, sample_keys, top_per_group

UNIT_IDS = torch.tensor([3, 9, 17, 40])
WINDOWS, LENGTH = 240, 16


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    """Four units of different shapes: never above 0, dense, sparse and heavy-tailed, tiny values."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(WINDOWS, LENGTH, 4, generator=g)
    acts = torch.stack([base[..., 0] - 9.0, base[..., 1] * 3.0, torch.relu(base[..., 2] - 1.5) ** 3 * 50.0,
                        base[..., 3] * 1e-4], dim=-1)
    acts[:, 3, 1] = torch.linspace(0.0, 400.0, WINDOWS)  # the range keeps growing: the histogram must double
    acts[7, 5, 2] = acts[9, 5, 2] = 1000.0  # a tie between two windows: the earlier comes first
    return acts


def run(acts: torch.Tensor, batch: int) -> CorpusStats:
    stats = CorpusStats(UNIT_IDS, LENGTH, first_position=1)
    for start in range(0, len(acts), batch):
        stats.update(acts[start : start + batch])
    return stats


def test_top_windows_density_and_histogram_equal_brute_force(acts):
    stats = run(acts, 11)
    counted = acts[:, 1:].double()
    assert stats.n_tokens == WINDOWS * (LENGTH - 1)
    for u in range(4):
        values = counted[..., u]
        window_max = values.amax(dim=1)
        order = sorted(range(WINDOWS), key=lambda w: (-float(window_max[w]), w))[:20]
        assert stats.top_window[u].tolist() == order
        assert int(stats.active[u]) == int((values > 0).sum())
        edges, counts = stats.histogram(u)
        active = values[values > 0].numpy()
        if len(active) == 0:
            assert (edges, counts) == ([], [])
            continue
        assert np.histogram(active, bins=edges)[0].tolist() == counts and sum(counts) == len(active)
        assert len(counts) <= 64 and counts[0] > 0 and counts[-1] > 0
        widths = np.diff(edges)
        assert np.all(widths == widths[0]) and np.log2(widths[0]).is_integer()  # one power-of-two width
    assert stats.top_window[2, :2].tolist() == [7, 9]


@pytest.mark.parametrize("batch", [1, 7, WINDOWS])
def test_the_statistics_do_not_depend_on_the_batching(acts, batch):
    one, other = run(acts, 11), run(acts, batch)
    for name in ("top_window", "active", "exp", "lo", "hi", "counts", "sample_key", "sample_token"):
        assert torch.equal(getattr(one, name), getattr(other, name)), name


def test_quantile_groups_sample_the_largest_keys_of_their_interval(acts):
    stats = run(acts, 13)
    groups = stats.quantile_groups()
    counted = acts[:, 1:].double()
    token_index = torch.arange(WINDOWS * LENGTH).reshape(WINDOWS, LENGTH)[:, 1:]
    for u in range(4):
        values = counted[..., u]
        keys = sample_keys(token_index.reshape(-1), UNIT_IDS[u].expand(token_index.numel())).reshape(values.shape)
        used = groups.count[u] > 0
        assert int(groups.count[u].sum()) == int((values > 0).sum())
        if not used.any():
            continue
        top = stats.histogram(u)[0][-1]
        lows, highs = groups.low[u][used], groups.high[u][used]
        assert torch.all(highs[:-1] <= lows[1:]) and float(highs[-1]) == top  # ordered intervals up to the top edge
        assert torch.all(highs - lows <= top / 10 + (highs - lows).min())  # about a tenth of (0, top] each
        for g in used.nonzero(as_tuple=True)[0].tolist():
            inside = (values >= groups.low[u, g]) & (values < groups.high[u, g]) & (values > 0)
            assert int(inside.sum()) == int(groups.count[u, g])
            ranked = torch.sort(torch.where(inside, keys, -1.0).reshape(-1), descending=True)
            expected = [int(token_index.reshape(-1)[i]) for k, i in zip(ranked.values[:5], ranked.indices[:5]) if k >= 0]
            assert [t for t in groups.token[u, g].tolist() if t >= 0] == expected


def test_sample_keys_are_distinct_per_unit_and_uniform():
    tokens = torch.arange(200_000)
    keys = sample_keys(tokens, torch.full_like(tokens, 91))
    assert len(torch.unique(keys)) == len(tokens) and bool(((keys > 0) & (keys < 1)).all())
    counts = torch.histc(keys.float(), bins=10, min=0, max=1)
    assert float((counts - 20_000).abs().max()) < 600  # about 4 standard deviations of a uniform count
    other = sample_keys(tokens, torch.full_like(tokens, 92))
    assert abs(float(torch.corrcoef(torch.stack([keys, other]))[0, 1])) < 0.01  # units draw independently


def test_top_per_group_equals_a_loop():
    g = torch.Generator().manual_seed(1)
    group = torch.randint(0, 7, (300,), generator=g)
    key = torch.rand(300, generator=g, dtype=torch.float64)
    payload = torch.arange(300)
    groups, keys, (values,) = top_per_group(group, key, [payload], 4)
    for i, grp in enumerate(groups.tolist()):
        members = sorted(((float(key[j]), j) for j in range(300) if group[j] == grp), reverse=True)[:4]
        assert values[i, : len(members)].tolist() == [j for _, j in members]
