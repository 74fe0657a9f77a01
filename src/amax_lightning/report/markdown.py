"""report.md: the summary table, its plots (``plots``) and ``activation_history.csv``, and a sweep's atlas, from typed
results; markdown escaping of untrusted token strings."""

from __future__ import annotations

import csv
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from amax_lightning.analysis.results import UnitResults  # noqa: E402
from amax_lightning.analysis.sweep import ATLAS_COLUMNS, AtlasResults  # noqa: E402
from amax_lightning.analysis.tables import read_units  # noqa: E402
from amax_lightning.base.files import write_atomic, write_text_atomic
from amax_lightning.report.plots import run_figures, save_png

_MARKDOWN_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|", "\\": "\\\\",
                     **{c: "\\" + c for c in "`*_[]~"}}


def markdown_cell(text: str) -> str:
    """``text`` safe in a markdown table cell: HTML's ``& < >`` as entities, ``|`` and markdown's inline marks
    (`` ` * _ [ ] ~ \\ ``) backslash-escaped, line breaks as ``\\n``. Tokens are untrusted text."""
    escaped = "".join(_MARKDOWN_ESCAPES.get(c, c) for c in text)
    return escaped.replace("\r", "\\r").replace("\n", "\\n")


def markdown_token(token: str) -> str:
    """A token in a markdown report: as a JSON string (control characters escaped), then ``markdown_cell``."""
    return markdown_cell(json.dumps(token))


def summary_markdown(results: UnitResults) -> str:
    """A markdown table (seed, tokens, cosines, final activation, decoded activation) and the uniqueness line."""
    priors = ", ".join(results.priors) or "none"
    lines = [
        f"target {markdown_cell(results.target)} ({results.aggregate} over positions) of {markdown_cell(results.model)}, "
        f"{results.steps} steps, " + (f"lr {results.lr}, priors: {priors}" if results.method == "continuous"
                                      else f"method {results.method}") + (" — PARTIAL" if results.partial else ""),
        "",
        "| seed | tokens | cosine | final activation | decoded activation |",
        "|---:|---|---|---:|---:|",
    ]
    for run in results.runs:
        tokens = " ".join(markdown_token(t) for t in run.tokens)
        cosines = " ".join(f"{c:.3f}" for c in run.cosine)
        lines.append(f"| {run.seed} | {tokens} | {cosines} | {run.final_activation:.4g} | {run.decoded_activation:.4g} |")
    u = results.uniqueness
    repeated = [f"{markdown_token(t)} x{c}" for t, c in zip(u.tokens, u.counts) if c > 1]
    lines += ["", f"unique tokens: {u.n_unique} of {u.n_total}" + (f" (repeated: {', '.join(repeated)})" if repeated else "")]
    if results.convergence is not None:
        lines.append(f"convergence: {results.convergence.verdict}")
    null = results.null_model
    if null:
        se = lambda v: f" ± {v:.2g}" if v else ""  # noqa: E731  (the Monte Carlo standard error; none when exact)
        lines.append(
            f"chance ({'random directions decoded' if null.n_samples else 'uniform over the allowed tokens'}): "
            f"expected {null.expected_n_unique:.1f}{se(null.expected_n_unique_se)} unique of {null.n_vectors}, "
            f"p-value of {u.n_unique} or fewer = {null.p_value:.3g}{se(null.p_value_se)}"
        )
    data = results.data_baseline
    if data and data.overlap:
        lines.append(
            f"data baseline: {data.overlap.count} of {data.overlap.n_gradient} gradient-ascent tokens are among the top "
            f"{len(data.top_tokens.token_ids)} one-token activations"
        )
    lines += corpus_lines(results)
    repro = results.reproducibility
    lines.append(
        f"position agreement {repro.mean_position_agreement:.2f}, pairwise Jaccard {repro.mean_pairwise_jaccard:.2f}, "
        f"pairwise embedding cosine {repro.mean_pairwise_cosine:.2f}, nearest-token cosine {repro.mean_nearest_cosine:.2f}, "
        f"decoding loses {repro.mean_decoded_gap:.4g} of the activation on average"
    )
    return "\n".join(lines)


def corpus_lines(results: UnitResults) -> list[str]:
    """Two lines on what real text does to the unit, beside what the optimizer found (none without a corpus)."""
    corpus = results.corpus
    if corpus is None:
        return []
    lines = [
        f"real text: {markdown_cell(corpus.source)}, {corpus.n_tokens:,} tokens in {corpus.n_windows:,} windows of "
        f"{corpus.window}" + (" (BOS not counted)" if corpus.bos_excluded else "")
        + f": {100 * corpus.density:.3g}% of tokens above {corpus.density_threshold:g}, highest {corpus.max:.4g}; "
        f"tokens at its top contexts' maxima: " + (", ".join(markdown_token(t) for t in corpus.top_tokens[:10]) or "none")
    ]
    k = corpus.comparison
    if k is not None:
        ratio = "" if k.optimized_over_corpus_max is None else f" ({k.optimized_over_corpus_max:.3g}x real text's)"
        lines.append(
            f"optimized beside real text: objective ({results.aggregate} over positions) {k.optimized_objective:.4g}, "
            f"decoded tokens {k.decoded_objective:.4g}; highest single token {k.optimized_max_token:.4g}{ratio}, "
            f"decoded {k.decoded_max_token:.4g}, real text {k.corpus_max:.4g}; decoded tokens among real text's top "
            f"tokens: " + (", ".join(markdown_token(t) for t in k.shared_tokens) or "none"))
    return lines


def write_report(log_dir: str, results: UnitResults, summary: str, steps: list[int], history: torch.Tensor,
                 history_seeds: list[int]) -> dict:
    """Write ``report.md``, its PNG plots and ``activation_history.csv`` into ``log_dir``; return the plots' pixels.

    ``history`` holds each seed's objective per step, shape (len(steps), seeds), its columns the seeds
    ``history_seeds``; the plots are returned as ``save_png`` gives them, so they can go to TensorBoard too.
    """
    figures = run_figures(results, steps, history, history_seeds)
    images = {name: save_png(figure, os.path.join(log_dir, f"{name}.png")) for name, figure in figures.items()}
    header = "step," + ",".join(f"seed_{s}" for s in history_seeds)
    rows = [f"{step}," + ",".join(f"{v:.9g}" for v in values.tolist()) for step, values in zip(steps, history)]
    write_text_atomic(os.path.join(log_dir, "activation_history.csv"), "\n".join([header, *rows]) + "\n")
    links = "\n".join(f"![{name}]({name}.png)" for name in images)
    write_text_atomic(os.path.join(log_dir, "report.md"), f"# Activation maximization report\n\n{summary}\n\n{links}\n")
    return images


def write_atlas_csv(path: str, folder: str) -> None:
    """``atlas.csv``: one line per unit (``sweep.ATLAS_COLUMNS``) from the sweep's units table, streamed."""
    cell = lambda v: "" if v is None else (f"{v:.9g}" if isinstance(v, float) else str(v))  # noqa: E731
    units = read_units(folder, columns=list(ATLAS_COLUMNS))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(ATLAS_COLUMNS)
            for batch in units.to_batches(max_chunksize=4096):
                columns = batch.to_pydict()
                writer.writerows([cell(v) for v in values] for values in zip(*(columns[c] for c in ATLAS_COLUMNS)))

    write_atomic(path, write)


def write_atlas(log_dir: str, results: AtlasResults) -> tuple[str, dict]:
    """Write ``atlas.csv``, ``atlas.png`` (units ranked by n_unique) and ``report.md`` for a sweep, from its tables.

    Returns the summary text (the most and the least reproducible units) and the plot's pixels, for TensorBoard.
    """
    write_atlas_csv(os.path.join(log_dir, "atlas.csv"), log_dir)
    counts, n_total = results.n_unique, len(results.histogram) - 1
    summary = [
        f"sweep of {results.n_units} units x {n_total} vectors each: n_unique min {counts['min']}, "
        f"median {counts['median']}, max {counts['max']}" + (" — PARTIAL" if results.partial else ""),
        f"tables: {results.tables['units']} (one row per unit), {results.tables['rows']} (one row per unit x seed)",
    ]
    if results.corpus and "corpus" in results.tables:
        corpus = results.corpus
        summary.append(
            f"real text: {markdown_cell(corpus['source'])}, {corpus['n_tokens']:,} tokens in {corpus['n_windows']:,} "
            f"windows of {corpus['window']}: each unit's max, density (above {corpus['density_threshold']:g}), histogram, "
            f"top and quantile examples in {results.tables['corpus']}, their windows in {results.tables['corpus_windows']}")
    for title, rows in (("most reproducible", results.most_reproducible),
                        ("least reproducible", results.least_reproducible)):
        summary += ["", f"{title}:", "",
                    "| unit | target | n_unique | mean final activation | mean nearest cosine | null p-value |",
                    "|---:|---|---:|---:|---:|---:|"]
        for row in rows:
            p_value = "-" if row.null_p_value is None else f"{row.null_p_value:.3g}"
            summary.append(f"| {markdown_cell(row.label)} | {markdown_cell(row.target)} | {row.n_unique} of "
                           f"{row.n_total} | {row.mean_final_activation:.4g} | {row.mean_nearest_cosine:.3f} | "
                           f"{p_value} |")
    text = "\n".join(summary)
    ranked_counts = [k for k, units in enumerate(results.histogram) for _ in range(units)]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(range(len(ranked_counts)), ranked_counts, lw=1)
    axes.set(xlabel="units, ranked", ylabel=f"unique tokens of {n_total}", title="atlas: reproducibility per unit")
    image = save_png(figure, os.path.join(log_dir, "atlas.png"))
    write_text_atomic(os.path.join(log_dir, "report.md"), f"# Activation maximization atlas\n\n{text}\n\n![atlas](atlas.png)\n")
    return text, {"atlas": image}
