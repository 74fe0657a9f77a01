"""Running statistics of many units over a stream of token windows, in memory bounded by units, not by the corpus.

For every unit, ``CorpusStats.update`` keeps, over the counted positions (all but a window's BOS):

- the ``k`` windows of highest maximum activation (ties: the earlier window);
- the count of tokens above ``threshold`` (the density's numerator);
- a histogram of the values above the threshold (0) in ``n_bins`` bins from 0 of the narrowest power-of-two width
  that holds them all: it starts at width ``2**FINEST_EXP`` and doubles (merging bins pairwise) when a value
  outgrows it, so its bins and counts are exact and the same whatever the batching;
- for each bin, the ``per_group`` tokens with the largest hashed keys among the bin's tokens: a uniform sample of
  them that does not depend on batching, sharding, or which other units were read (``sample_keys``).

``finish`` splits ``(0, top]`` (top: the upper edge of the highest occupied bin) into ``groups`` intervals of equal
width, snapped to bin edges, as sae_vis's quantile groups are: each gets its share of the tokens and ``per_group``
tokens drawn uniformly from it (the largest keys among its bins' samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_K = 20  # top-activating windows kept per unit (sae_vis: 20)
GROUPS = 10  # quantile groups (sae_vis: 10)
PER_GROUP = 5  # examples per quantile group (sae_vis: 5)
N_BINS = 64  # histogram bins per unit, from 0; the highest value lies in the upper half of them
DENSITY_THRESHOLD = 0.0
FINEST_EXP = -24  # the narrowest bin, 2**-24 (6e-8): values up to 2**39 (5e11) keep int64 bin indices
_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit integers (held in int64) that mixes every input bit into every output bit."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def token_keys(token_index: torch.Tensor) -> torch.Tensor:
    """Each token's key numerator: an odd integer below 2**33, distinct for distinct token indices (< 2**32)."""
    return 2 * _hash32(token_index.long() & _M32) + 1


def unit_scramble(unit_ids: torch.Tensor) -> torch.Tensor:
    """Each unit's key multiplier: an odd integer below 2**20, float64."""
    return (2 * (_hash32(unit_ids.long() & _M32) >> 13) + 1).double()


def keys_of(token_numerator: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """Keys ``frac(k * m / 2**33)`` in (0, 1): exact in float64 (k * m < 2**53) and, for one unit, a bijection of the
    tokens' odd numerators (an odd multiplier permutes the odd residues mod 2**33), so distinct and never 0;
    broadcast over the arguments' shapes."""
    scaled = token_numerator.double() * (multiplier / 2.0**33)
    return scaled - torch.floor(scaled)


def sample_keys(token_index: torch.Tensor, unit_ids: torch.Tensor) -> torch.Tensor:
    """Keys in (0, 1), float64, one per (token index, unit id) pair: a fixed pseudo-random function of the pair,
    distinct for distinct tokens of one unit (token index < 2**32). A unit's tokens of largest key are a uniform
    sample of its tokens, and different units draw different samples."""
    return keys_of(token_keys(token_index), unit_scramble(unit_ids))


def top_per_group(group: torch.Tensor, key: torch.Tensor, payload: list[torch.Tensor], m: int
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """For each distinct ``group`` (0 <= group < 2**29), its ``m`` entries of largest ``key`` (in [0, 1], distinct
    within a group to 2**-33): returns the groups (ascending, G), their keys (G, m; -1 where a group has fewer) and
    each payload gathered the same way (G, m; 0 where empty). One sort of (group, descending key) as int64."""
    order = torch.sort(group.long() * 2**34 + torch.floor((1.0 - key.double()) * 2.0**33).long()).indices
    g = group[order]
    first = torch.ones_like(g, dtype=torch.bool)
    first[1:] = g[1:] != g[:-1]
    index = torch.arange(len(g), device=g.device)
    rank = index - torch.cummax(torch.where(first, index, torch.zeros_like(index)), 0).values
    groups, slot = torch.unique_consecutive(g, return_inverse=True)
    keep = rank < m
    keys = torch.full((len(groups), m), -1.0, dtype=torch.float64, device=g.device)
    keys[slot[keep], rank[keep]] = key[order][keep].double()
    out = []
    for values in payload:
        filled = torch.zeros((len(groups), m), dtype=values.dtype, device=g.device)
        filled[slot[keep], rank[keep]] = values[order][keep]
        out.append(filled)
    return groups, keys, out


@dataclass
class QuantileGroups:
    """Per unit (U) and group (G): ``low``/``high`` value edges (NaN where empty), ``count`` of tokens, and the
    sampled tokens (U, G, per_group) by their ``token`` index in the stream of windows (-1: none)."""

    low: torch.Tensor
    high: torch.Tensor
    count: torch.Tensor
    token: torch.Tensor


class CorpusStats:
    """Streaming statistics of ``unit_ids`` (U,) over windows of ``window`` tokens whose positions from
    ``first_position`` on are counted (1 when each window starts with BOS)."""

    def __init__(self, unit_ids: torch.Tensor, window: int, first_position: int, k: int = TOP_K,
                 n_bins: int = N_BINS, per_group: int = PER_GROUP, threshold: float = DENSITY_THRESHOLD) -> None:
        device = unit_ids.device
        self.unit_ids, self.window, self.first_position = unit_ids.long(), window, first_position
        self.k, self.n_bins, self.per_group, self.threshold = k, n_bins, per_group, threshold
        units = len(unit_ids)
        self.n_windows = 0
        self.top_value = torch.full((units, k), -torch.inf, device=device)
        self.top_window = torch.full((units, k), -1, dtype=torch.long, device=device)
        self.active = torch.zeros(units, dtype=torch.long, device=device)
        self.exp = torch.full((units,), FINEST_EXP, dtype=torch.long, device=device)  # bin b holds [b, b + 1) * 2**exp
        self.lo = torch.zeros(units, dtype=torch.long, device=device)  # the lowest and highest occupied bins
        self.hi = torch.zeros(units, dtype=torch.long, device=device)
        self.seen = torch.zeros(units, dtype=torch.bool, device=device)
        self.counts = torch.zeros((units, n_bins), dtype=torch.long, device=device)
        self.sample_key = torch.full((units, n_bins, per_group), -1.0, dtype=torch.float64, device=device)
        self.sample_token = torch.zeros((units, n_bins, per_group), dtype=torch.long, device=device)
        self._scramble = unit_scramble(self.unit_ids)

    @property
    def n_tokens(self) -> int:
        """Counted tokens so far."""
        return self.n_windows * (self.window - self.first_position)

    @staticmethod
    def state_bytes(units: int, k: int = TOP_K, n_bins: int = N_BINS, per_group: int = PER_GROUP) -> int:
        """Memory of the statistics of ``units`` units (bytes)."""
        return units * (k * 12 + n_bins * 8 + n_bins * per_group * 16 + 48)

    def update(self, acts: torch.Tensor) -> None:
        """Add the next windows' activations, shape (windows, window, U), in corpus order."""
        counted = acts[:, self.first_position :, :].float()
        n, positions, units = counted.shape
        windows = torch.arange(self.n_windows, self.n_windows + n, device=acts.device)
        self._update_top(counted.amax(dim=1).T, windows)
        token = (windows[:, None] * self.window + torch.arange(self.first_position, self.window, device=acts.device))
        token = token.reshape(-1)
        self._add_values(counted.reshape(n * positions, units), token)
        self.n_windows += n

    def _update_top(self, window_max: torch.Tensor, window_ids: torch.Tensor) -> None:
        values = torch.cat([self.top_value, window_max], dim=1)
        ids = torch.cat([self.top_window, window_ids.expand(len(window_max), -1)], dim=1)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, : self.k]  # ties: earlier window
        self.top_value, self.top_window = values.gather(1, order), ids.gather(1, order)

    def _add_values(self, values: torch.Tensor, token: torch.Tensor) -> None:
        """Count tokens' values (N, U) above the threshold into the histograms and samples; ``token`` (N,) indices.
        Dense over (N, U): the only per-entry lists are of tokens that enter a sample."""
        units, bins = len(self.unit_ids), self.n_bins
        active = values > self.threshold
        count = active.sum(dim=0)
        self.active += count
        touched = count > 0
        if not bool(touched.any()):
            return
        low = torch.where(active, values, torch.inf).amin(dim=0).double()
        high = values.amax(dim=0).double()
        t = touched.nonzero(as_tuple=True)[0]
        hi = self._bin(high[t], self.exp[t])
        shift = torch.zeros_like(hi)
        while True:  # the fewest doublings that keep every unit's highest value inside its bins
            wide = (hi >> shift) >= bins
            if not wide.any():
                break
            shift += wide.long()
        grown = shift > 0
        if grown.any():  # a wider grid: bins merge pairwise (rare after the first values)
            self._regrid(t[grown], shift[grown])
        self.exp[t] += shift
        lo = self._bin(low[t], self.exp[t])
        earlier = self.seen[t]
        self.lo[t] = torch.where(earlier, torch.minimum(self.lo[t], lo), lo)
        self.hi[t] = torch.where(earlier, torch.maximum(self.hi[t], hi >> shift), hi >> shift)
        self.seen[t] = True
        scale = torch.exp2(-self.exp.float())  # powers of two (at most 2**24): the products and floors are exact
        local = torch.floor(values * scale)  # in [0, bins) where active
        column = torch.arange(units, device=values.device) * (bins + 1)
        cell = torch.where(active, local, float(bins)).long() + column  # inactive: a last, discarded bin per unit
        counts = torch.bincount(cell.reshape(-1), minlength=units * (bins + 1)).view(units, bins + 1)
        self.counts += counts[:, :bins]
        threshold = torch.cat([self.sample_key[..., -1], torch.full((units, 1), torch.inf, dtype=torch.float64,
                                                                     device=values.device)], dim=1)
        key = keys_of(token_keys(token)[:, None], self._scramble)
        better = key > threshold.view(-1)[cell]  # only tokens that enter their bin's sample
        rows, cols = better.nonzero(as_tuple=True)
        if len(rows):
            inner = cell[rows, cols] - column[cols] + cols * bins
            self._merge_samples(inner, key[rows, cols], token[rows])

    @staticmethod
    def _bin(value: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        """Global bin index ``floor(value / 2**exp)``: exact, as dividing by a power of two is."""
        return torch.floor(value.double() / torch.exp2(exp.double())).long()

    def _regrid(self, units: torch.Tensor, shift: torch.Tensor) -> None:
        """Widen units' bins ``2**shift`` times: bin b's counts and samples move to bin ``b >> shift``."""
        bins, m = self.n_bins, self.per_group
        moved = torch.arange(bins, device=units.device) >> shift[:, None]
        counts = self.counts[units]
        self.counts[units] = torch.zeros_like(counts).scatter_add_(1, moved, counts)
        self.lo[units] = self.lo[units] >> shift
        self.hi[units] = self.hi[units] >> shift
        keys = self.sample_key[units]
        filled = keys >= 0
        if filled.any():
            row = torch.arange(len(units), device=units.device)[:, None, None].expand(-1, bins, m)
            cell = (row * bins + moved[:, :, None].expand(-1, -1, m))[filled]
            groups, new_keys, (new_tokens,) = top_per_group(cell, keys[filled], [self.sample_token[units][filled]], m)
            for name, values, empty in (("sample_key", new_keys, -1.0), ("sample_token", new_tokens, 0)):
                table = getattr(self, name)
                rows = torch.full_like(table[units], empty).view(-1, m)
                rows[groups] = values
                table[units] = rows.view(len(units), bins, m)

    def _merge_samples(self, cell: torch.Tensor, key: torch.Tensor, token: torch.Tensor) -> None:
        m = self.per_group
        marked = torch.zeros(self.sample_key.shape[0] * self.n_bins, dtype=torch.bool, device=cell.device)
        marked[cell] = True
        cells = marked.nonzero(as_tuple=True)[0]  # the distinct cells, ascending (cheaper than sorting them)
        keys, tokens = self.sample_key.view(-1, m), self.sample_token.view(-1, m)
        old_keys, old_tokens = keys[cells], tokens[cells]
        filled = old_keys >= 0
        groups, new_keys, (new_tokens,) = top_per_group(
            torch.cat([cells[:, None].expand(-1, m)[filled], cell]), torch.cat([old_keys[filled], key]),
            [torch.cat([old_tokens[filled], token])], m)
        keys[groups], tokens[groups] = new_keys, new_tokens

    # --- the end of the pass --------------------------------------------------------------------------------------
    def histogram(self, unit: int) -> tuple[list[float], list[int]]:
        """Unit ``unit``'s (position in unit_ids) histogram of its values above the threshold: the edges of its
        occupied bins (n + 1 values) and their counts (n); empty lists when no token was above it."""
        if not bool(self.seen[unit]):
            return [], []
        width = 2.0 ** int(self.exp[unit])
        first, last = int(self.lo[unit]), int(self.hi[unit])
        return [b * width for b in range(first, last + 2)], self.counts[unit, first : last + 1].tolist()

    def quantile_groups(self, groups: int = GROUPS) -> QuantileGroups:
        """Every unit's ``groups`` equal-width intervals of (0, top], snapped to bin edges (a bin joins the interval
        holding its centre): value edges, token counts, and ``per_group`` tokens sampled uniformly from each."""
        units, bins, m = len(self.unit_ids), self.n_bins, self.per_group
        device = self.counts.device
        width = torch.exp2(self.exp.double())
        first = torch.arange(bins, device=device).expand(units, -1)
        top = (self.hi + 1).double() * width
        centre = (first.double() + 0.5) * width[:, None]
        group = torch.floor(centre * groups / top[:, None]).long().clamp(0, groups - 1)
        used = (self.counts > 0) & self.seen[:, None]
        cell = torch.arange(units, device=device)[:, None] * groups + group
        count = torch.zeros(units * groups, dtype=torch.long, device=device).index_add_(0, cell[used], self.counts[used])
        low = torch.full((units * groups,), torch.inf, dtype=torch.float64, device=device)
        low = low.scatter_reduce(0, cell[used], (first.double() * width[:, None])[used], "amin")
        high = torch.full((units * groups,), -torch.inf, dtype=torch.float64, device=device)
        high = high.scatter_reduce(0, cell[used], ((first + 1).double() * width[:, None])[used], "amax")
        empty = count == 0
        low[empty], high[empty] = torch.nan, torch.nan
        token = torch.full((units * groups, m), -1, dtype=torch.long, device=device)
        filled = self.sample_key >= 0
        if filled.any():
            sample_cell = cell[:, :, None].expand(-1, -1, m)[filled]
            cells, keys, (tokens,) = top_per_group(sample_cell, self.sample_key[filled], [self.sample_token[filled]], m)
            token[cells] = torch.where(keys >= 0, tokens, -1)
        shape = (units, groups)
        return QuantileGroups(low.view(shape), high.view(shape), count.view(shape), token.view(*shape, m))
