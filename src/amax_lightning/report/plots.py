"""The run's plots as PNG files (and RGB arrays for TensorBoard): curves, token frequency, similarity, cosine."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402  (matplotlib's own PNG writer)

from amax_lightning.analysis.results import UnitResults  # noqa: E402
from amax_lightning.base.files import write_atomic


def save_png(figure, path: str) -> np.ndarray:
    """Draw ``figure`` once (tight layout, 100 dpi), write it to ``path`` as PNG, close it, return its pixels.

    Returns an (H, W, 3) uint8 array, for TensorBoard's ``add_image(..., dataformats="HWC")``: drawing is the
    slow part of a plot, and ``add_figure`` would draw it again (and ``bbox_inches="tight"`` twice).
    """
    try:
        figure.set_dpi(100)
        figure.set_layout_engine("tight")
        figure.canvas.draw()
        pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(figure)  # pyplot keeps every figure alive until it is closed (a study makes many)
    write_atomic(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="png"))
    return pixels


def _curves(results: UnitResults, steps: list[int], history: torch.Tensor, history_seeds: list[int]):
    figure, axes = plt.subplots(figsize=(7, 4))
    for column, seed in enumerate(history_seeds if steps else []):
        axes.plot(steps, history[:, column].numpy(), lw=1, label=f"seed {seed}")
    axes.set(xlabel="step", ylabel=f"objective ({results.aggregate} activation)", title=results.target)
    if steps and len(history_seeds) <= 12:
        axes.legend(fontsize=7, ncol=2)
    return figure


def _pareto(results: UnitResults):
    """EPO: each seed's frontier of activation against the model's own cross-entropy."""
    figure, axes = plt.subplots(figsize=(7, 4))
    for seed in results.pareto:
        points = sorted((p.cross_entropy, p.activation) for p in seed.frontier)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, lw=1, label=f"seed {seed.seed}")
    axes.set(xlabel="cross-entropy (nats per token)", ylabel=f"objective ({results.aggregate} activation)",
             title=f"EPO Pareto frontiers: {results.target}")
    if len(results.pareto) <= 12:
        axes.legend(fontsize=7, ncol=2)
    return figure


def _token_frequency(results: UnitResults, top: int = 30):
    u = results.uniqueness
    pairs = sorted(zip(u.counts, u.tokens), key=lambda pair: -pair[0])[:top]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.bar(range(len(pairs)), [count for count, _ in pairs])
    axes.set_xticks(range(len(pairs)), [json.dumps(token)[1:-1] for _, token in pairs], rotation=90, fontsize=7)
    axes.set(ylabel="vectors decoded to it", title=f"{u.n_unique} unique tokens of {u.n_total}")
    return figure


def _similarity(results: UnitResults):
    matrix = results.reproducibility.embedding_cosine_matrix
    figure, axes = plt.subplots(figsize=(5, 4))
    image = axes.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
    seeds = results.seeds
    if len(seeds) <= 20:
        axes.set_xticks(range(len(seeds)), seeds, fontsize=7)
        axes.set_yticks(range(len(seeds)), seeds, fontsize=7)
    axes.set(title="cosine between seeds' optimized embeddings", xlabel="seed", ylabel="seed")
    figure.colorbar(image)
    return figure


def _nearest_cosine(results: UnitResults):
    cosines = [c for run in results.runs for c in run.cosine]
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.hist(cosines, bins=20, range=(-1, 1))
    axes.set(xlabel="cosine to nearest vocabulary token", ylabel="vectors", title="how token-like the optimum is")
    return figure


PLOTS = ("activation_curves", "token_frequency", "embedding_similarity", "nearest_cosine")


def run_figures(results: UnitResults, steps: list[int], history: torch.Tensor, history_seeds: list[int]) -> dict:
    """The run's figures by name (``PLOTS``, and ``pareto`` for EPO): matplotlib figures, not yet saved."""
    figures = {
        "activation_curves": _curves(results, steps, history, history_seeds),
        "token_frequency": _token_frequency(results),
        "embedding_similarity": _similarity(results),
        "nearest_cosine": _nearest_cosine(results),
    }
    if results.pareto:
        figures["pareto"] = _pareto(results)
    return figures
