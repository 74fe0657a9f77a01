"""The Pareto frontier of token search (EPO): per row, the non-dominated (activation, cross-entropy) points."""

from __future__ import annotations

import math

import torch

FRONTIER_CAPACITY = 512  # Pareto points kept per row; beyond it the highest-activation ones are kept


def pareto_merge(frontier: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 points: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 capacity: int = FRONTIER_CAPACITY) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the non-dominated points (higher activation, lower cross-entropy) among a frontier and new points.

    Each argument is (activation (rows, n), cross_entropy (rows, n), tokens (rows, n, T)); empty slots hold
    (-inf, +inf). Exact duplicates of (activation, cross_entropy) keep the first. The result has ``capacity``
    slots per row, highest activation first.
    """
    act = torch.cat([frontier[0], points[0]], dim=1)
    ce = torch.cat([frontier[1], points[1]], dim=1)
    tokens = torch.cat([frontier[2], points[2]], dim=1)
    order = torch.argsort(ce, dim=1, stable=True)  # activation descending, ties by cross-entropy ascending
    order = order.gather(1, torch.argsort(act.gather(1, order), dim=1, descending=True, stable=True))
    act, ce = act.gather(1, order), ce.gather(1, order)
    tokens = tokens.gather(1, order[..., None].expand_as(tokens))
    best_before = torch.cummin(ce, dim=1).values.roll(1, dims=1)
    best_before[:, 0] = math.inf
    keep = ce < best_before  # lower cross-entropy than every point of at least its activation
    front = torch.argsort(keep.to(torch.int8), dim=1, descending=True, stable=True)[:, :capacity]
    kept = keep.gather(1, front)
    act = torch.where(kept, act.gather(1, front), -math.inf)
    ce = torch.where(kept, ce.gather(1, front), math.inf)
    tokens = torch.where(kept[..., None], tokens.gather(1, front[..., None].expand(-1, -1, tokens.shape[-1])), 0)
    return act, ce, tokens
