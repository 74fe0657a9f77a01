"""One pass over a corpus for every unit of a run: what real text does to each unit (``corpus_stats``), then a short
second pass over only the windows its examples come from, for their per-token activations.

The first pass runs the model up to the units' hook once per batch of windows and reads every unit from the same
hook values; its memory is the units' statistics, not the corpus (``CorpusStats.state_bytes``). The windows'
token ids are kept (4 bytes per token) so that the second pass does not read the corpus again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from amax_lightning.analysis.corpus_source import CorpusSpec, bos_and_separator, describe, iter_windows
from amax_lightning.analysis.corpus_stats import (
    DENSITY_THRESHOLD,
    GROUPS,
    PER_GROUP,
    TOP_K,
    CorpusStats,
    QuantileGroups,
)
from amax_lightning.base.progress import Progress

ACTIVATION_ELEMENTS = 16 * 2**20  # windows x tokens x units read per forward: bounds the activations' memory
MAX_BATCH_WINDOWS = 64
DENSE_BYTES = 56  # per token x unit of a batch: its activations, the dense temporaries and the first batches' sample lists
# (an upper bound: benchmarks/whole_sae.py --corpus-tokens 20000, 24,576 latents, windows of 32: the job's peak RSS grew
# by 0.73 GB where pass_bytes says 1.32 GB)


def batch_windows(window: int, n_units: int) -> int:
    """Windows per forward: at most ``ACTIVATION_ELEMENTS`` activations and ``MAX_BATCH_WINDOWS`` windows."""
    return max(1, min(MAX_BATCH_WINDOWS, ACTIVATION_ELEMENTS // (window * n_units)))


def example_bytes(n_units: int, window: int, k: int = TOP_K, groups: int = GROUPS, per_group: int = PER_GROUP) -> int:
    """Memory of the examples' per-token activations of ``n_units`` units (float32, bytes)."""
    return n_units * (k + groups * per_group) * window * 4


def pass_bytes(n_units: int, window: int, tokens: int) -> int:
    """About the memory of one pass reading ``n_units`` units (bytes): their statistics, their examples'
    activations, a batch's activations and dense temporaries, and the windows' token ids (4 bytes a token)."""
    dense = batch_windows(window, n_units) * window * n_units * DENSE_BYTES
    return CorpusStats.state_bytes(n_units) + example_bytes(n_units, window) + dense + tokens * 4


def units_per_pass(n_units: int, window: int, tokens: int, free_bytes: int | None) -> int:
    """The most of ``n_units`` units one pass may read within half of ``free_bytes`` (all when that is unknown; at
    least 1): a sweep wider than that reads the corpus once per group of that many units."""
    if free_bytes is None or pass_bytes(n_units, window, tokens) <= free_bytes // 2:
        return n_units
    low, high = 1, n_units  # pass_bytes grows with the units
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if pass_bytes(middle, window, tokens) <= free_bytes // 2 else (low, middle - 1)
    return low


@dataclass
class CorpusUnits:
    """What the corpus did to U units.

    ``windows`` (n_windows, window) are the token ids fed to the model; a token's index in that stream is
    ``window_index * window + position``. Positions before ``first_position`` (the BOS) are not counted.
    ``top_window`` (U, k; -1: none) and ``top_acts`` (U, k, window) are each unit's highest windows, best first;
    ``quantiles`` its groups, with ``quantile_acts`` (U, G, per_group, window) the sampled tokens' windows.
    """

    source: str
    window: int
    first_position: int
    threshold: float
    n_windows: int
    n_tokens: int
    active: torch.Tensor
    histograms: list[tuple[list[float], list[int]]]
    top_window: torch.Tensor
    top_acts: torch.Tensor
    quantiles: QuantileGroups
    quantile_acts: torch.Tensor
    windows: torch.Tensor

    def meta(self) -> dict:
        """What every unit's corpus result shares: results.json's ``corpus`` for a sweep."""
        return {"source": self.source, "n_tokens": self.n_tokens, "n_windows": self.n_windows, "window": self.window,
                "bos_excluded": bool(self.first_position), "density_threshold": self.threshold}

    def max(self) -> torch.Tensor:
        """Each unit's largest activation over the counted tokens, shape (U,)."""
        return self.top_acts[:, 0, self.first_position :].amax(dim=-1)

    def density(self) -> torch.Tensor:
        """Each unit's fraction of counted tokens above the threshold, float64 (U,)."""
        return self.active.double() / max(self.n_tokens, 1)


def corpus_pass(spec: CorpusSpec, tokenizer, embed: Callable[[torch.Tensor], torch.Tensor],
                read: Callable[[torch.Tensor], torch.Tensor], unit_ids: torch.Tensor, device: torch.device,
                progress: bool = True) -> CorpusUnits:
    """Read the corpus once for every unit.

    Parameters
    ----------
    spec
        The corpus (``corpus_source.corpus_spec``).
    tokenizer
        The model's tokenizer.
    embed, read
        ``embed(token_ids) -> inputs_embeds`` and ``read(inputs_embeds) -> (windows, window, U)``: the units'
        activations (the backbone up to their hook, then the readout of the U units).
    unit_ids
        Each unit's identity (U,), e.g. its SAE latent or hook coordinate: it seeds the unit's quantile sample, so a
        unit gets the same sample whichever other units are read with it.
    device
        Where the forwards and the statistics run.
    """
    bos, _ = bos_and_separator(tokenizer)
    first_position = int(bos is not None)
    unit_ids = unit_ids.to(device)
    stats = CorpusStats(unit_ids, spec.window, first_position)
    per_batch = batch_windows(spec.window, len(unit_ids))
    kept: list[torch.Tensor] = []
    with torch.no_grad(), Progress("corpus pass", spec.n_windows * spec.window, "tokens", enabled=progress) as shown:
        for ids in iter_windows(spec, tokenizer, per_batch):
            stats.update(read(embed(ids.to(device))))
            kept.append(ids.to(torch.int32))
            shown.advance(ids.numel())
    windows = torch.cat(kept)
    quantiles = stats.quantile_groups()
    top_acts, quantile_acts = example_activations(windows, stats.top_window, quantiles.token, embed, read, device,
                                                  per_batch)
    return CorpusUnits(
        source=describe(spec), window=spec.window, first_position=first_position, threshold=DENSITY_THRESHOLD,
        n_windows=len(windows), n_tokens=stats.n_tokens, active=stats.active.cpu(),
        histograms=[stats.histogram(u) for u in range(len(unit_ids))], top_window=stats.top_window.cpu(),
        top_acts=top_acts, quantiles=QuantileGroups(*(t.cpu() for t in vars(quantiles).values())),
        quantile_acts=quantile_acts, windows=windows)


def example_activations(windows: torch.Tensor, top_window: torch.Tensor, sampled_token: torch.Tensor, embed, read,
                        device: torch.device, per_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token activations of each unit's top windows (U, k, window) and of the windows of its sampled tokens
    (U, G, per_group, window), from one forward per batch of the distinct windows they name (NaN: no example)."""
    units, k = top_window.shape
    length = windows.shape[1]
    sampled_window = torch.where(sampled_token >= 0, sampled_token // length, -1).cpu()
    slots = torch.cat([top_window.cpu(), sampled_window.reshape(units, -1)], dim=1)  # (U, k + G * per_group)
    out = torch.full((units, slots.shape[1], length), torch.nan)
    unit, slot = (slots >= 0).nonzero(as_tuple=True)
    needed, which = torch.unique(slots[unit, slot], return_inverse=True)
    order = torch.argsort(which)  # the (unit, slot) pairs by window: each batch's pairs are one contiguous run
    unit, slot, which = unit[order], slot[order], which[order]
    bounds = torch.searchsorted(which, torch.arange(0, len(needed) + per_batch, per_batch)).tolist()
    with torch.no_grad():
        for batch, start in enumerate(range(0, len(needed), per_batch)):
            acts = read(embed(windows[needed[start : start + per_batch]].long().to(device))).float().cpu()
            here = slice(bounds[batch], bounds[batch + 1])
            out[unit[here], slot[here]] = acts[which[here] - start, :, unit[here]]
    return out[:, :k], out[:, k:].reshape(*sampled_token.shape, length)
