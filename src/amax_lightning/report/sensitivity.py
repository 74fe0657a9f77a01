"""The sensitivity study's files: sensitivity.md, .json, .csv, its plots and report.html, from the summary dict
(``analysis.sensitivity`` computes it; the recorder in ``lightning/sensitivity_recorder.py`` writes it)."""

from __future__ import annotations

import csv
import io
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from amax_lightning.base.files import write_text_atomic  # noqa: E402
from amax_lightning.report.html import write_sensitivity_page  # noqa: E402
from amax_lightning.report.markdown import markdown_cell  # noqa: E402
from amax_lightning.report.plots import save_png  # noqa: E402

PLOTS = ("agreement_vs_size", "distance_vs_step", "agreement_vs_steps")
PLOT_TITLES = {"agreement_vs_size": "Replica token agreement against perturbation size",
               "distance_vs_step": "Distance between replicas per step",
               "agreement_vs_steps": "Token agreement between seeds per step"}

CSV_COLUMNS = ("target", "step", "size", "replica_token_agreement", "replica_embedding_cosine", "replica_distance",
               "growth_rate", "growth_first_step", "growth_last_step", "seed_token_agreement", "seed_embedding_cosine",
               "mean_objective", "mean_nearest_cosine")


def markdown(document: dict) -> str:
    """sensitivity.md: per target the verdict, the per-size table at the last snapshot, snapshots and numerics."""
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


def figures(document: dict) -> dict:
    """The three plots: replica agreement vs perturbation size, distance vs step per size (log), agreement vs steps."""
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


def write_summary(folder: str, document: dict) -> str:
    """Write sensitivity.json, sensitivity.csv, sensitivity.md and the plots (also to TensorBoard) into ``folder``;
    return the path of sensitivity.md."""
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
