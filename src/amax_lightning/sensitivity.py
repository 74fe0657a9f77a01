"""Why seeds disagree: basins, plateau or chaos. Perturbed replicas of every seed in one batch, and the numbers.

Every seed runs from its own start and from copies of it perturbed by each relative size (``param.perturb``): rows =
seeds x sizes x replicas, one batch (``RowLayout.copies``), chunked and DDP-sharded like any run. The
``SensitivityRecorder`` callback records, every step, the relative distance between replicas of a seed, and at
snapshot steps the decoded tokens of every row. ``summarize`` turns that into per-size agreement, embedding cosine,
distance growth rates and a verdict (``verdict``); ``python -m amax_lightning sensitivity`` (``run_sensitivity``)
adds the numerics comparison (fp64 / fp32 / bf16, alone vs in a batch) and writes ``sensitivity/version_N``.

Units: distances are Frobenius norms of a row's parameter (n_tokens x width) divided by the mean norm of the two
rows; growth rates are in natural-log units per optimizer step; agreements are fractions of positions.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from amax_lightning.decode import nearest_tokens
from amax_lightning.errors import UserError

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


# --- metrics ---------------------------------------------------------------------------------------------
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


# --- the recorder ----------------------------------------------------------------------------------------
class SensitivityRecorder(Callback):
    """Records a perturbed run (``--model.perturb_sizes``): every step each size's mean relative distance between a
    seed's replicas, and at ``snapshots`` (and the last step) every row's decoded tokens and the metrics of
    ``snapshot_metrics``. At the end of the fit, rank 0 writes ``sensitivity.json`` and ``sensitivity.md`` of this
    run into its log folder (``summary`` holds the same dict). Its records ride in checkpoints, so a resumed run
    reports its whole history.
    """

    def __init__(self, snapshots: list[int] | None = None) -> None:
        self.snapshots = sorted({int(s) for s in snapshots}) if snapshots else []
        if any(s < 1 for s in self.snapshots):
            raise UserError(f"snapshots {snapshots} must be steps >= 1")
        self.steps: list[int] = []
        self.distances: list[list[float]] = []  # per recorded step, per size
        self.snapshot_records: list[dict] = []
        self.previous_tokens: torch.Tensor | None = None
        self.summary: dict | None = None
        self.summary_path: str | None = None

    def state_dict(self) -> dict:
        return {"steps": self.steps, "distances": self.distances, "snapshot_records": self.snapshot_records,
                "previous_tokens": self.previous_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.distances = list(state["steps"]), [list(d) for d in state["distances"]]
        self.snapshot_records, self.previous_tokens = list(state["snapshot_records"]), state["previous_tokens"]

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        if trainer.global_step == 0 and not self.steps and trainer.is_global_zero:
            self._record_distances(module, 0)

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        self._record_distances(module, step)
        if step in self.snapshots or step == trainer.max_steps:
            self._record_snapshot(module, step)

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        module.flush_finite_check()  # a deferred finiteness check: a bad run writes nothing
        if not trainer.is_global_zero:
            return
        self.summary = summarize(module, self)
        self.summary_path = write_summary(log_dir, {"targets": [self.summary]})
        print(self.summary_path, flush=True)

    # per step: (seeds, sizes, replicas, ...) views of the run's rows -----------------------------------
    @staticmethod
    def grouped(module: LightningModule, rows: torch.Tensor) -> torch.Tensor:
        """Rows (seeds x sizes x replicas, ...) as (seeds, sizes, replicas, ...)."""
        sizes = len(module.hparams.perturb_sizes)
        return rows.view(len(module.seeds), sizes, module.hparams.replicas, *rows.shape[1:])

    def _record_distances(self, module: LightningModule, step: int) -> None:
        with torch.no_grad():  # replicas >= 2 (the module checks): one host sync per step for all sizes
            grouped = self.grouped(module, module.parameter.detach())
            per_size = torch.stack([relative_distances(grouped[:, k]).mean() for k in range(grouped.shape[1])])
        self.steps.append(step)
        self.distances.append(per_size.tolist())

    @torch.no_grad()
    def _record_snapshot(self, module: LightningModule, step: int) -> None:
        if any(record["step"] == step for record in self.snapshot_records):
            return
        embedding = module.objective.embeddings(module.parameter.detach())
        tokens, cosine = nearest_tokens(embedding, module.backbone.vocab_embeddings)
        objective = module.history[-1] if module.history else torch.full((module.n_rows,), math.nan)
        record = snapshot_metrics(step, self.grouped(module, tokens.cpu()), self.grouped(module, embedding.cpu()),
                                  self.grouped(module, cosine.cpu()), self.grouped(module, objective.cpu()),
                                  module.hparams.perturb_sizes, self.previous_tokens)
        self.previous_tokens = self.grouped(module, tokens.cpu())[:, reference_size(module.hparams.perturb_sizes), 0]
        self.snapshot_records.append(record)


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


def summarize(module: LightningModule, recorder: SensitivityRecorder) -> dict:
    """One target's sensitivity summary: settings, distance curves and growth rates per size, the snapshots, and
    the verdict of the last snapshot."""
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


# --- files -----------------------------------------------------------------------------------------------
CSV_COLUMNS = ("target", "step", "size", "replica_token_agreement", "replica_embedding_cosine", "replica_distance",
               "growth_rate", "growth_first_step", "growth_last_step", "seed_token_agreement", "seed_embedding_cosine",
               "mean_objective", "mean_nearest_cosine")


def csv_rows(summary: dict) -> list[dict]:
    """One row per target x snapshot x size."""
    rows = []
    growth = {g["size"]: g for g in summary["growth"]}
    for snapshot in summary["snapshots"]:
        for size in snapshot["sizes"]:
            fit = growth[size["size"]]
            rows.append({"target": summary["target"], "step": snapshot["step"], **{k: size[k] for k in CSV_COLUMNS[2:6]},
                         "growth_rate": fit["rate"], "growth_first_step": fit["first_step"],
                         "growth_last_step": fit["last_step"],
                         "seed_token_agreement": snapshot["seeds"]["token_agreement"],
                         "seed_embedding_cosine": snapshot["seeds"]["embedding_cosine"],
                         "mean_objective": snapshot["seeds"]["mean_objective"],
                         "mean_nearest_cosine": snapshot["seeds"]["mean_nearest_cosine"]})
    return rows


def markdown(document: dict) -> str:
    """sensitivity.md: per target the verdict, the per-size table at the last snapshot, snapshots and numerics."""
    from amax_lightning.report import markdown_cell

    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# Sensitivity: basins, plateau or chaos", ""]
    for summary in document["targets"]:
        last = summary["snapshots"][-1] if summary["snapshots"] else None
        lines += [f"## {markdown_cell(summary['target'])}", "",
                  f"{len(summary['seeds'])} seeds x {len(summary['sizes'])} sizes x {summary['replicas']} replicas, "
                  f"lr {summary['lr']}, model {summary['model']}", "",
                  f"**Verdict ({', '.join(summary['verdict']['labels'])}).** {summary['verdict']['text']}", ""]
        if last:
            lines += [f"Replicas of each seed at step {last['step']} (sizes relative to each initial vector's norm; "
                      "growth rate = d ln(distance) / d step over the stated range):", "",
                      "| size | token agreement | embedding cosine | relative distance | growth rate | range |",
                      "|---:|---:|---:|---:|---:|---|"]
            for size, fit in zip(last["sizes"], summary["growth"]):
                span = f"{fit['first_step']}-{fit['last_step']}" if fit["rate"] is not None else fit.get("reason", "-")
                lines.append(f"| {size['size']:g} | {fmt(size['replica_token_agreement'])} | "
                             f"{fmt(size['replica_embedding_cosine'])} | {fmt(size['replica_distance'])} | "
                             f"{fmt(fit['rate'])} | {span} |")
        lines += ["", "Across seeds (each seed's unperturbed run) by step:", "",
                  "| step | token agreement | embedding cosine | mean objective | nearest-token cosine | changed since previous |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for snapshot in summary["snapshots"]:
            seeds = snapshot["seeds"]
            lines.append(f"| {snapshot['step']} | {fmt(seeds['token_agreement'])} | {fmt(seeds['embedding_cosine'])} | "
                         f"{fmt(seeds['mean_objective'])} | {fmt(seeds['mean_nearest_cosine'])} | "
                         f"{fmt(seeds['changed_since_previous'])} |")
        if summary.get("numerics_variants"):
            lines += ["", f"Numerics (same seeds, {summary['numerics_steps']} steps), against {summary['numerics_reference']}:",
                      "", "| variant | token agreement | max abs objective difference |", "|---|---:|---:|"]
            for variant in summary["numerics_variants"]:
                lines.append(f"| {variant['variant']} | {fmt(variant['token_agreement'])} | "
                             f"{fmt(variant['max_abs_objective_difference'])} |")
        if summary.get("numerics_note"):
            lines += ["", summary["numerics_note"]]
        lines.append("")
    lines += [f"![{name}]({name}.png)" for name in PLOTS] if document.get("plots") else []
    return "\n".join(lines) + "\n"


PLOTS = ("agreement_vs_size", "distance_vs_step", "agreement_vs_steps")
PLOT_TITLES = {"agreement_vs_size": "Replica token agreement against perturbation size",
               "distance_vs_step": "Distance between replicas per step",
               "agreement_vs_steps": "Token agreement between seeds per step"}


def figures(document: dict) -> dict:
    """The three plots: replica agreement vs perturbation size, distance vs step per size (log), agreement vs steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {name: plt.subplots(figsize=(7, 4)) for name in PLOTS}
    for summary in document["targets"]:
        label = summary["target"]
        if summary["snapshots"]:
            last = summary["snapshots"][-1]["sizes"]
            points = [(s["size"], s["replica_token_agreement"]) for s in last if s["size"] > 0
                      and s["replica_token_agreement"] is not None]
            out["agreement_vs_size"][1].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        steps = summary["distance_curves"]["steps"]
        for size, curve in zip(summary["sizes"], summary["distance_curves"]["mean_relative_distance"]):
            if size > 0:
                out["distance_vs_step"][1].plot(steps, curve, lw=1, label=f"{label} size {size:g}")
        snaps = summary["snapshots"]
        out["agreement_vs_steps"][1].plot([s["step"] for s in snaps], [s["seeds"]["token_agreement"] for s in snaps],
                                          marker="o", label=f"{label} seeds")
    axes = out["agreement_vs_size"][1]
    axes.set(xscale="log", xlabel="perturbation size (relative)", ylabel="replica token agreement", ylim=(-0.05, 1.05))
    axes = out["distance_vs_step"][1]
    axes.set(yscale="log", xlabel="step", ylabel="relative distance between replicas")
    axes = out["agreement_vs_steps"][1]
    axes.set(xlabel="step", ylabel="token agreement between seeds", ylim=(-0.05, 1.05))
    for _, axes in out.values():
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    return {name: figure for name, (figure, _) in out.items()}


def write_summary(folder: str, document: dict) -> str:
    """Write sensitivity.json, sensitivity.csv, sensitivity.md and the plots (also to TensorBoard) into ``folder``;
    return the path of sensitivity.md."""
    import csv
    import io

    from torch.utils.tensorboard import SummaryWriter

    from amax_lightning.report import save_png
    from amax_lightning.report_html import write_sensitivity_page
    from amax_lightning.runs import write_text_atomic

    os.makedirs(folder, exist_ok=True)
    plots = figures(document)
    document = {**document, "plots": [f"{name}.png" for name in plots]}
    write_text_atomic(os.path.join(folder, "sensitivity.json"), json.dumps(document, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for summary in document["targets"]:
        writer.writerows(csv_rows(summary))
    write_text_atomic(os.path.join(folder, "sensitivity.csv"), buffer.getvalue())
    board = SummaryWriter(folder)
    for name, figure in plots.items():
        board.add_image(f"sensitivity/{name}", save_png(figure, os.path.join(folder, f"{name}.png")), 0,
                        dataformats="HWC")
    board.add_text("sensitivity/verdict", " ".join(s["verdict"]["text"] for s in document["targets"]), 0)
    board.close()
    path = os.path.join(folder, "sensitivity.md")
    write_text_atomic(path, markdown(document))
    write_sensitivity_page(folder, document, PLOT_TITLES)
    return path
