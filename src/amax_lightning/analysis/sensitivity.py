"""Why seeds disagree: basins, plateau or chaos. Perturbed replicas of every seed in one batch, and the numbers.

Every seed runs from its own start and from copies of it perturbed by each relative size (``param.perturb``): rows =
seeds x sizes x replicas, one batch (``RowLayout.copies``), chunked and DDP-sharded like any run. The
recorder (``lightning/sensitivity_recorder.py``) records, every step, the relative distance between replicas of a
seed, and at snapshot steps the decoded tokens of every row. This module holds the numbers: distances, agreements,
growth rates, each snapshot's metrics (``snapshot_metrics``) and the verdict (``verdict``). The pages are
``report/sensitivity.py``; ``python -m amax_lightning sensitivity`` (``commands/sensitivity.py``) adds the numerics
comparison (fp64 / fp32 / bf16, alone vs in a batch) and writes ``sensitivity/version_N``.

Units: distances are Frobenius norms of a row's parameter (n_tokens x width) divided by the mean norm of the two
rows; growth rates are in natural-log units per optimizer step; agreements are fractions of positions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

SIZES = (0.0, 1e-7, 1e-5, 1e-3, 1e-1)
REPLICAS = 4
SNAPSHOTS = (500, 1000, 2000, 5000)
NUMERICS = ("64-true", "32-true", "bf16-mixed")
CHAOS_AGREEMENT = 0.9  # replicas at the smallest positive size agreeing on fewer positions than this: chaotic
PLATEAU_COSINE = 0.5  # seeds' optima this similar (embedding cosine) ...
PLATEAU_AGREEMENT = 0.5  # ... yet agreeing on fewer tokens than this: one plateau, decoded arbitrarily
BASIN_SIZE = 1e-3  # replicas agreeing (>= CHAOS_AGREEMENT) up to this size while seeds (far apart) do not: basins
MOVING = 0.1  # more than this share of the seeds' tokens changed between the last two snapshots: not converged
SATURATION = 10.0  # the exponential phase ends where the distance comes within this factor of its maximum


def _pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    first, second = torch.triu_indices(n, n, offset=1)
    return first, second


def relative_distances(parameters: torch.Tensor) -> torch.Tensor:
    """For groups of rows (groups, members, ...): each pair's ``||a - b|| / mean(||a||, ||b||)``, (groups, pairs)."""
    flat = parameters.flatten(2).double()
    first, second = _pairs(flat.shape[1])
    a, b = flat[:, first], flat[:, second]
    return (a - b).norm(dim=-1) / ((a.norm(dim=-1) + b.norm(dim=-1)) / 2).clamp_min(1e-300)


def token_agreement(tokens: torch.Tensor) -> float | None:
    """Mean over groups and member pairs of the share of positions where both decode to the same token; tokens
    (groups, members, n_tokens). None with fewer than two members."""
    if tokens.shape[1] < 2:
        return None
    first, second = _pairs(tokens.shape[1])
    return float((tokens[:, first] == tokens[:, second]).double().mean())


def embedding_cosine(embeddings: torch.Tensor) -> float | None:
    """Mean over groups and member pairs of the cosine between flattened embeddings (groups, members, T, d)."""
    if embeddings.shape[1] < 2:
        return None
    flat = torch.nn.functional.normalize(embeddings.flatten(2).double(), dim=-1)
    first, second = _pairs(flat.shape[1])
    return float((flat[:, first] * flat[:, second]).sum(-1).mean())


def growth_rate(steps: list[int], distances: list[float], saturation: float = SATURATION) -> dict[str, Any]:
    """The exponential growth rate of a distance curve: the least-squares slope of ``ln(distance)`` per step from the
    first step to where the curve first comes within ``saturation`` x of its maximum.

    Returns ``{"rate", "first_step", "last_step"}``, with ``rate`` None and a ``reason`` where the curve has no
    exponential phase (a zero distance, or less than ``saturation`` x growth over at least 3 points).
    """
    values = np.asarray(distances, dtype=float)
    if len(values) < 3 or not np.all(values > 0):
        return {"rate": None, "first_step": None, "last_step": None, "reason": "distance is 0 or too few steps"}
    logs = np.log(values)
    top = logs.max()
    end = int(np.argmax(logs >= top - math.log(saturation)))
    if logs[end] - logs[0] < math.log(saturation) or end < 2:
        return {"rate": None, "first_step": None, "last_step": None,
                "reason": f"the distance grows less than {saturation:g}x before saturating"}
    x = np.asarray(steps[: end + 1], dtype=float)
    slope = float(np.polyfit(x, logs[: end + 1], 1)[0])
    return {"rate": slope, "first_step": int(steps[0]), "last_step": int(steps[end])}


def verdict(summary: dict) -> dict[str, Any]:
    """Which explanation the numbers support, by the stated thresholds; a one-paragraph text and its labels.

    ``summary`` needs ``sizes`` (each with ``size`` and ``replica_token_agreement``) and ``seeds`` (with
    ``token_agreement`` and ``embedding_cosine``) as ``summarize`` makes them.
    """
    sizes = [s for s in summary["sizes"] if s["replica_token_agreement"] is not None]
    positive = [s for s in sizes if s["size"] > 0]
    seeds = summary["seeds"]
    labels, sentences = [], []
    if positive:
        smallest = min(positive, key=lambda s: s["size"])
        if smallest["replica_token_agreement"] < CHAOS_AGREEMENT:
            labels.append("chaotic")
            sentences.append(
                f"Chaotic at this scale: replicas perturbed by {smallest['size']:g} agree on only "
                f"{smallest['replica_token_agreement']:.2f} of positions (< {CHAOS_AGREEMENT}), so float rounding alone "
                "can change the tokens.")
    seed_agreement, seed_cosine = seeds.get("token_agreement"), seeds.get("embedding_cosine")
    if seed_agreement is not None and seed_cosine is not None:
        if seed_cosine > PLATEAU_COSINE and seed_agreement < PLATEAU_AGREEMENT:
            labels.append("plateau")
            sentences.append(
                f"Plateau: the seeds' optima are similar (embedding cosine {seed_cosine:.2f} > {PLATEAU_COSINE}) yet "
                f"agree on only {seed_agreement:.2f} of tokens (< {PLATEAU_AGREEMENT}): decoding picks arbitrary "
                "tokens near one broad optimum.")
        stable = [s for s in positive if s["size"] <= BASIN_SIZE]
        if stable and all(s["replica_token_agreement"] >= CHAOS_AGREEMENT for s in stable) \
                and seed_agreement < PLATEAU_AGREEMENT and seed_cosine <= PLATEAU_COSINE:
            labels.append("basins")
            sentences.append(
                f"Basins: replicas agree (>= {CHAOS_AGREEMENT}) for every perturbation up to {BASIN_SIZE:g} but seeds, "
                f"far apart (embedding cosine {seed_cosine:.2f} <= {PLATEAU_COSINE}), agree on only "
                f"{seed_agreement:.2f} of tokens: each seed falls into its own stable basin.")
        if seed_agreement >= PLATEAU_AGREEMENT:
            labels.append("reproducible")
            sentences.append(f"Reproducible: seeds agree on {seed_agreement:.2f} of tokens (>= {PLATEAU_AGREEMENT}).")
    changed = seeds.get("changed_since_previous")
    if changed is not None and changed > MOVING:
        labels.append("not converged")
        sentences.append(f"Not converged: {changed:.2f} of the seeds' tokens changed since the previous snapshot "
                         f"(> {MOVING}); more steps may change the answer.")
    if not labels:
        labels.append("undetermined")
        sentences.append("No rule applies: none of the stated thresholds is crossed.")
    return {"labels": labels, "text": " ".join(sentences)}


def reference_size(sizes: list[float]) -> int:
    """The size index whose replica 0 stands for each seed's own run: size 0 if present, else the smallest."""
    return min(range(len(sizes)), key=lambda k: sizes[k])


def snapshot_metrics(step: int, tokens: torch.Tensor, embeddings: torch.Tensor, cosine: torch.Tensor,
                     objective: torch.Tensor, sizes: list[float], previous: torch.Tensor | None) -> dict:
    """Metrics of one snapshot from grouped tensors (seeds, sizes, replicas, ...): per size the replicas' token
    agreement, embedding cosine and relative distance; across seeds (each seed's reference row) token agreement,
    embedding cosine, mean objective, mean nearest-token cosine, and the share of tokens changed since ``previous``."""
    ref = reference_size(sizes)
    per_size = []
    for k, size in enumerate(sizes):
        distance = relative_distances(embeddings[:, k]) if embeddings.shape[2] > 1 else None
        per_size.append({"size": size, "replica_token_agreement": token_agreement(tokens[:, k]),
                         "replica_embedding_cosine": embedding_cosine(embeddings[:, k]),
                         "replica_distance": float(distance.mean()) if distance is not None else None})
    own = tokens[:, ref, 0]
    return {
        "step": step, "sizes": per_size,
        "seeds": {"token_agreement": token_agreement(own[None]), "embedding_cosine": embedding_cosine(embeddings[None, :, ref, 0]),
                  "mean_objective": float(objective[:, ref, 0].mean()),
                  "mean_nearest_cosine": float(cosine[:, ref, 0].mean()),
                  "changed_since_previous": None if previous is None else float((own != previous).double().mean())},
    }


def summarize(module, recorder) -> dict:
    """One target's sensitivity summary: settings, distance curves and growth rates per size, the snapshots, and
    the verdict of the last snapshot. ``module`` is the run's ActMaxModule (its settings are read), ``recorder`` its
    ``SensitivityRecorder`` (``steps``, ``distances``, ``snapshot_records``)."""
    sizes = list(module.hparams.perturb_sizes)
    curves = np.asarray(recorder.distances, dtype=float).T if recorder.distances else np.zeros((len(sizes), 0))
    growth = [growth_rate(recorder.steps, list(curve)) if size > 0 else
              {"rate": None, "first_step": None, "last_step": None, "reason": "control: no perturbation"}
              for size, curve in zip(sizes, curves)]
    last = recorder.snapshot_records[-1] if recorder.snapshot_records else None
    summary = {
        "target": module.hparams.target, "model": module.model_name_or_path, "seeds": list(module.seeds),
        "sizes": sizes, "replicas": module.hparams.replicas, "n_tokens": module.n_tokens, "lr": module.lr,
        "priors": list(module.prior_names), "numerics": module.numerics(),
        "distance_curves": {"steps": list(recorder.steps), "mean_relative_distance": curves.tolist()},
        "growth": [{"size": size, **fit} for size, fit in zip(sizes, growth)],
        "snapshots": recorder.snapshot_records,
        "thresholds": {"chaos_agreement": CHAOS_AGREEMENT, "plateau_cosine": PLATEAU_COSINE,
                       "plateau_agreement": PLATEAU_AGREEMENT, "basin_size": BASIN_SIZE, "saturation": SATURATION,
                       "moving": MOVING},
    }
    summary["verdict"] = verdict(last) if last else {"labels": ["undetermined"], "text": "no snapshot was taken"}
    return summary
