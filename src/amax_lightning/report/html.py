"""report.html: one self-contained page per run, sweep, study and sensitivity study.

Pages come from Jinja2 templates (``templates/``) with autoescaping on: every token string is untrusted text and is
only ever inserted escaped, or as JSON in a ``<script type="application/json">`` block (``tojson`` escapes ``<``,
``>``, ``&`` and ``'``), which the page's script reads and writes with ``textContent``. A page needs no network:
CSS, script and images are inline (plots as ``data:`` PNGs, charts as SVG), links are relative, and its
Content-Security-Policy allows nothing to be fetched and only the page's own script (by hash) to run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import platform
import sys
import unicodedata
from datetime import datetime, timezone
from importlib import metadata
from urllib.parse import quote

import jinja2
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from amax_lightning.analysis.corpus_tables import CORPUS_TABLES
from amax_lightning.analysis.results import UnitResults
from amax_lightning.analysis.sweep import AtlasResults
from amax_lightning.analysis.tables import iter_row_blocks, read_units
from amax_lightning.base.files import write_text_atomic

NEURONPEDIA = "https://www.neuronpedia.org/"
PACKAGES = ("amax_lightning", "torch", "transformers", "lightning", "torchmetrics", "numpy")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # matplotlib's tab10: the plots' seed colours
NEGATIVE, ZERO, POSITIVE = (33, 102, 172), (255, 255, 255), (178, 24, 43)  # the diverging scale's ends, RGB

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("amax_lightning.report", "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


# --- text and colour, as every page shows them ---------------------------------------------------------------
_INVISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍", " ": "·"}


def visible(token: str) -> str:
    """A token as it is shown: newlines and tabs as ``↵`` and ``⇥``, other control and format characters
    (NUL, right-to-left marks, zero-width joiners) as ``⟨U+200F⟩``, the empty string as ``∅``; leading and
    trailing spaces as ``·``. Escaping for HTML is the template's job, not this function's."""
    shown = []
    for position, char in enumerate(token):
        edge = position == 0 or position == len(token) - 1
        if char in _INVISIBLE and (char != " " or edge):
            shown.append(_INVISIBLE[char])
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            shown.append(f"⟨U+{ord(char):04X}⟩")
        else:
            shown.append(char)
    return "".join(shown) or "∅"


def diverging(value: float, scale: float) -> str:
    """The background of an activation: white at 0, blue for negative, red for positive, full colour at
    ``|value| >= scale``; as ``rgb(r, g, b)``. The atlas's script computes the same (``page.js``)."""
    t = 0.0 if not scale or not math.isfinite(value) else max(-1.0, min(1.0, value / scale))
    end = POSITIVE if t > 0 else NEGATIVE
    r, g, b = (round(z + abs(t) * (e - z)) for z, e in zip(ZERO, end))
    return f"rgb({r}, {g}, {b})"


def ink(value: float, scale: float) -> str:
    """Text colour on ``diverging(value, scale)``: white on a strong colour, else near-black."""
    return "#fff" if scale and math.isfinite(value) and abs(value) / scale > 0.6 else "#111"


def symmetric_scale(values) -> float:
    """The colour scale's end: the largest finite |value| (1.0 when there is none)."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    return max(finite) if finite and max(finite) > 0 else 1.0


def fmt(value, digits: int = 4) -> str:
    """A number as the pages print it: ``digits`` significant digits, ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def percent(fraction) -> str:
    """A fraction as a percentage with 3 significant digits (``73%``, ``0.0122%``); ``-`` for None."""
    return "-" if fraction is None else f"{100 * fraction:.3g}%"


def neuronpedia_link(url) -> str | None:
    """``url`` if it is a Neuronpedia page, else None (a config could hold any text)."""
    return url if isinstance(url, str) and url.startswith(NEURONPEDIA) and "\\" not in url else None


def relative_link(path: str, start: str) -> str:
    """A relative, URL-quoted link from folder ``start`` to ``path``: it works from ``file://`` and when both move."""
    return quote(os.path.relpath(path, start).replace(os.sep, "/"), safe="/")


def png_data_uri(path: str) -> str | None:
    """A PNG file as a ``data:`` URI (None when the file is missing)."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        return "data:image/png;base64," + base64.b64encode(handle.read()).decode("ascii")


def versions() -> dict[str, str]:
    """Python and the packages that decide the numbers, with their versions."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def quoted(token: str) -> str:
    """A token as a JSON string literal (escapes for control characters), format characters as ``\\uXXXX``."""
    text = json.dumps(token, ensure_ascii=False)
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cf", "Zl", "Zp") else c for c in text)


_ENV.filters.update(visible=visible, fmt=fmt, quoted=quoted, percent=percent)
_ENV.globals.update(zip=zip)


def render(template: str, title: str, **context) -> str:
    """A page: ``template`` with ``context``, its script allowed by hash in the page's Content-Security-Policy."""
    script = _ENV.get_template("page.js").render()
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return _ENV.get_template(template).render(
        title=title, script=script, script_hash=f"sha256-{digest}", versions=versions(), argv=" ".join(sys.argv),
        written=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **context)


def write_page(folder: str, template: str, title: str, **context) -> str:
    """Render a page and write it atomically to ``folder/report.html``; return its path."""
    path = os.path.join(folder, "report.html")
    write_text_atomic(path, render(template, title, **context))
    return path


# --- single unit -------------------------------------------------------------------------------------------------
def answer(results: UnitResults) -> str:
    """The result in one sentence: n_unique against chance and its p-value."""
    u, null = results.uniqueness, results.null_model
    text = f"{u.n_unique} of {u.n_total} decoded tokens are unique"
    if null is None:
        return text + " (no null model was computed: run with --results.null_samples > 0 for the chance level)."
    source = "random directions decoded" if null.n_samples else "uniform over the allowed tokens"
    if null.p_value is None:
        return f"{text}; chance ({source}) expects {null.expected_n_unique:.1f}."
    verdict = ("fewer than chance: the seeds agree more than random starts would"
               if null.p_value < 0.05 else "no fewer than chance: the seeds do not find a common optimum")
    return (f"{text}; chance ({source}) expects {null.expected_n_unique:.1f} (p = {null.p_value:.3g} for "
            f"{u.n_unique} or fewer): {verdict}.")


def token_rows(results: UnitResults, scale: float | None = None) -> tuple[list[dict], float]:
    """Per seed, its tokens with their activations and colours (optimized input and decoded token, one scale:
    ``scale``, or by default the largest |activation| of the seeds')."""
    if scale is None:
        scale = symmetric_scale(seed_activations(results))
    rows = []
    for run in results.runs:
        tokens = []
        for i, token in enumerate(run.tokens):
            optimized, decoded = run.position_activations[i], run.decoded_position_activations[i]
            tokens.append({
                "id": run.token_ids[i], "text": token, "optimized": optimized, "decoded": decoded,
                "colour_optimized": diverging(optimized, scale), "ink_optimized": ink(optimized, scale),
                "colour_decoded": diverging(decoded, scale), "ink_decoded": ink(decoded, scale),
                "cosine": run.cosine[i], "norm": run.embedding_norm[i],
                "nearest": run.nearest[i] if results.method == "continuous" and run.nearest else [],
            })
        rows.append({"seed": run.seed, "final": run.final_activation, "decoded": run.decoded_activation,
                     "gap": run.decoded_gap, "tokens": tokens})
    return rows, scale


def seed_activations(results: UnitResults) -> list[float]:
    """Every seed's activations at each position, of the optimized input and of the decoded tokens."""
    return [a for run in results.runs for a in (*run.position_activations, *run.decoded_position_activations)]


def pareto_chart(results: UnitResults, width: int = 680, height: int = 340) -> dict | None:
    """EPO's frontiers as SVG scatter coordinates: x = cross-entropy, y = activation; each point keeps its text."""
    if not results.pareto:
        return None
    points = [(seed, p) for seed in results.pareto for p in seed.frontier]
    if not points:
        return None
    xs, ys = [p.cross_entropy for _, p in points], [p.activation for _, p in points]
    box = _axes_box(min(xs), max(xs), min(ys), max(ys), width, height)
    series = []
    for index, seed in enumerate(results.pareto):
        marks = [{"x": box["x"](p.cross_entropy), "y": box["y"](p.activation),
                  "tip": f"seed {seed.seed}: {visible(p.text)}  (activation {p.activation:.4g}, cross-entropy "
                         f"{p.cross_entropy:.3f})"} for p in sorted(seed.frontier, key=lambda p: p.cross_entropy)]
        series.append({"seed": seed.seed, "colour": PALETTE[index % len(PALETTE)], "points": marks})
    return {**box["frame"], "series": series, "x_label": "cross-entropy (nats per token)",
            "y_label": f"objective ({results.aggregate} activation)"}


def convergence_charts(results: UnitResults, width: int = 440, height: int = 240) -> list[dict]:
    """Two charts against the step: n_unique, and the fraction of tokens changed since the previous snapshot."""
    convergence = results.convergence
    if convergence is None or not convergence.snapshots:
        return []
    steps = [s.step for s in convergence.snapshots]
    charts = []
    for key, title, low, high, colour in (
            ("n_unique", "n_unique", 0, results.uniqueness.n_total, PALETTE[0]),
            ("changed_fraction", "changed", 0, 1, PALETTE[1])):
        values = [getattr(s, key) for s in convergence.snapshots]
        box = _axes_box(min(steps) if len(steps) > 1 else 0, max(steps), low, high, width, height)
        marks = [{"x": box["x"](step), "y": box["y"](value),
                  "tip": f"step {step}: {title} {value:.3g}" if isinstance(value, float) else f"step {step}: {title} {value}"}
                 for step, value in zip(steps, values)]
        charts.append({**box["frame"], "series": [{"name": title, "colour": colour, "points": marks}],
                       "x_label": "step", "y_label": title if key == "n_unique" else "fraction of tokens changed"})
    return charts


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) inside [low, high]."""
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw / 1.5)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def tick_label(value: float) -> str:
    """An axis tick: whole numbers with thousands separators (``12,000``), others with 3 significant digits."""
    if float(value).is_integer() and abs(value) < 1e9:
        return f"{int(value):,}"
    return fmt(float(value), 3)


def _axes_box(x0: float, x1: float, y0: float, y1: float, width: int, height: int, pad: int = 48) -> dict:
    """Linear maps from data to SVG pixels inside a ``pad`` margin, with round ticks on each axis."""
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    sx = lambda v: pad + (v - x0) / (x1 - x0) * (width - 1.5 * pad)  # noqa: E731
    sy = lambda v: height - pad + (v - y0) / (y1 - y0) * -(height - 1.5 * pad)  # noqa: E731
    frame = {"width": width, "height": height, "pad": pad,
             "x_ticks": [{"at": sx(v), "label": tick_label(v)} for v in nice_ticks(x0, x1)],
             "y_ticks": [{"at": sy(v), "label": tick_label(v)} for v in nice_ticks(y0, y1)]}
    return {"x": sx, "y": sy, "frame": frame}


# --- real text (the corpus pass) ----------------------------------------------------------------------------------
SNIPPET = (24, 8)  # tokens before and after the max (or sampled) token that the run page shows of a window
ATLAS_SNIPPET = (6, 2)  # the same in the atlas's expanded rows, where 24,576 units x 3 contexts must stay small
ATLAS_CONTEXTS = 3  # top contexts per unit in the atlas
TOP_OPEN = 10  # top contexts shown open on the run page; the rest are one click away


def snippet(length: int, position: int, around: tuple[int, int] = SNIPPET) -> tuple[int, int]:
    """The window positions ``[start, stop)`` shown around ``position``: ``around`` tokens before and after it."""
    before, after = around
    return max(0, position - before), min(length, position + after + 1)


def context_rows(examples, bos_excluded: bool, scale: float, around: tuple[int, int] = SNIPPET) -> list[dict]:
    """Corpus examples (``CorpusExample``), each as the tokens of its snippet around ``position``, coloured on
    ``scale``; the framed token is at ``position``, a window's BOS (not counted) is marked and not coloured; the
    whole window's text is kept for the hover on the ellipses."""
    rows = []
    for example in examples:
        length = len(example.tokens)
        start, stop = snippet(length, example.position, around)
        tokens = []
        for i in range(start, stop):
            value, bos = example.activations[i], bos_excluded and i == 0
            tokens.append({"text": example.tokens[i], "id": example.token_ids[i], "position": i, "activation": value,
                           "bos": bos, "framed": i == example.position,
                           "colour": "#eee" if bos else diverging(value, scale), "ink": "#666" if bos else ink(value, scale)})
        rows.append({"max": example.max, "position": example.position, "activation": example.activations[example.position],
                     "tokens": tokens, "cut_before": start > 0, "cut_after": stop < length, "length": length,
                     "window": visible("".join(example.tokens))})
    return rows


def snippet_values(examples, bos_excluded: bool, around: tuple[int, int] = SNIPPET) -> list[float]:
    """The counted activations that ``context_rows`` colours (a window's BOS excluded)."""
    values = []
    for example in examples:
        start, stop = snippet(len(example.tokens), example.position, around)
        values += example.activations[max(start, int(bos_excluded)):stop]
    return values


def corpus_histogram(corpus, width: int = 640, height: int = 220) -> dict | None:
    """The histogram of the activations above the density threshold as SVG bars (None when no token is above it)."""
    edges, counts = corpus.histogram.get("edges") or [], corpus.histogram.get("counts") or []
    if not counts or not sum(counts):
        return None
    box = _axes_box(edges[0], edges[-1], 0, max(counts), width, height, pad=64)
    bars = [{"x": box["x"](low), "y": box["y"](n), "w": max(box["x"](high) - box["x"](low) - 1, 1),
             "h": box["y"](0) - box["y"](n), "tip": f"{fmt(low, 3)} to {fmt(high, 3)}: {n:,} token{'s' * (n != 1)}"}
            for low, high, n in zip(edges, edges[1:], counts) if n > 0]
    return {**box["frame"], "bars": bars, "x_label": f"activation (tokens above {fmt(corpus.density_threshold)})",
            "y_label": "tokens", "above": sum(counts)}


def corpus_section(results: UnitResults, scale: float) -> dict | None:
    """The run page's "Real text" section: top contexts, quantile groups (highest first) and the histogram, every
    token coloured on ``scale`` (the page's one scale); None when no corpus was read."""
    corpus = results.corpus
    if corpus is None:
        return None
    top = context_rows(corpus.top_examples, corpus.bos_excluded, scale)
    groups = [{"low": g.low, "high": g.high, "fraction": g.fraction,
               "examples": context_rows(g.examples, corpus.bos_excluded, scale)} for g in reversed(corpus.quantiles)]
    return {"top": top[:TOP_OPEN], "more": top[TOP_OPEN:], "groups": groups, "histogram": corpus_histogram(corpus),
            "own_scale": symmetric_scale(corpus_values(results))}


def corpus_values(results: UnitResults) -> list[float]:
    """The corpus activations the run page colours: the snippets of its top and quantile examples."""
    corpus = results.corpus
    if corpus is None:
        return []
    examples = [*corpus.top_examples, *(e for g in corpus.quantiles for e in g.examples)]
    return snippet_values(examples, corpus.bos_excluded)


def settings(results: UnitResults) -> list[tuple[str, str]]:
    """The run's protocol and numerics as (name, value) rows."""
    rows = [("model", results.model), ("target", results.target), ("method", results.method),
            ("steps", str(results.steps) + (" (partial: interrupted)" if results.partial else "")),
            ("seeds", ", ".join(map(str, results.seeds))), ("tokens per seed", str(results.n_tokens)),
            ("aggregate over positions", results.aggregate)]
    if results.method == "continuous":
        rows += [("learning rate", fmt(results.lr)), ("l2", fmt(results.l2)),
                 ("priors", ", ".join(results.priors) or "none")]
    rows += [("initial scale (std of the input embeddings)", fmt(results.init_scale)),
             ("mean vocabulary norm", fmt(results.vocab_norm))]
    rows += [(f"search: {key}", str(value)) for key, value in (results.search or {}).items()]
    rows += [(f"numerics: {key}", str(value)) for key, value in results.numerics.items()]
    if results.null_model:
        null = results.null_model
        errors = ", ".join(f"{name} standard error {value:.2g}" for name, value in
                           (("expected n_unique", null.expected_n_unique_se), ("p-value", null.p_value_se))
                           if value is not None)
        rows += [("null model", f"{null.n_samples} random directions, {null.n_simulations} simulated studies"
                                + (f"; {errors}" if errors else ""))]
    return rows


UNIT_PLOTS = (("activation_curves", "Objective per step, per seed"),
              ("token_frequency", "How often each decoded token occurs"),
              ("embedding_similarity", "Cosine between the seeds' optimized embeddings"),
              ("nearest_cosine", "Cosine of each optimized vector to its nearest token"))


def write_unit_page(log_dir: str, results: UnitResults) -> str:
    """Write ``report.html`` for a run of one unit, from its results and the PNG plots already in ``log_dir``."""
    scale = symmetric_scale(seed_activations(results) + corpus_values(results))  # one scale for every coloured token
    rows, scale = token_rows(results, scale)
    plots = [(title, png_data_uri(os.path.join(log_dir, f"{name}.png"))) for name, title in UNIT_PLOTS]
    record = results.sae or results.direction
    return write_page(
        log_dir, "unit.html.j2", f"amax_lightning: {results.target}", r=results, answer=answer(results), rows=rows,
        scale=scale, plots=[(t, uri) for t, uri in plots if uri], pareto=pareto_chart(results),
        convergence=convergence_charts(results), corpus=corpus_section(results, scale), snippet=SNIPPET,
        settings=settings(results),
        record=sorted(record.items()) if record else None,
        neuronpedia=neuronpedia_link((results.sae or {}).get("neuronpedia")),
        repeated=[(t, c) for t, c in sorted(zip(results.uniqueness.tokens, results.uniqueness.counts),
                                            key=lambda pair: -pair[1]) if c > 1])


# --- sweep -------------------------------------------------------------------------------------------------------
ATLAS_COLUMNS = (  # key, label, kind, sorted ascending on the first click
    ("label", "unit", "int", True), ("n_unique", "n unique", "int", True),
    ("mean_final_activation", "mean final act.", "num", False),
    ("min_final_activation", "min final act.", "num", False),
    ("mean_nearest_cosine", "nearest cosine", "num", False),
    ("mean_pairwise_jaccard", "seeds' Jaccard", "num", False),
    ("null_p_value", "null p", "num", True),
    ("stable_since", "settled since", "int", True), ("changed_fraction_last", "changed last", "num", True),
    ("verdict", "verdict", "text", True),
)
CORPUS_COLUMNS = (  # before the verdict, when the sweep read a corpus
    ("corpus_max", "corpus max", "num", False), ("corpus_density", "density", "pct", False),
    ("optimized_over_corpus_max", "opt. / corpus max", "num", False),
)
P_VALUE = 0.05  # below it, a unit's n_unique is called fewer than chance


def verdict(p_value: float | None) -> str:
    """A unit's n_unique against chance, in two words (the one-unit page's sentence, shortened)."""
    if p_value is None:
        return "no null"
    return "fewer than chance" if p_value < P_VALUE else "as chance"


def _short(value: float) -> float:
    """3 significant digits: the atlas's per-token numbers, which only colour tokens and fill tooltips."""
    return float(f"{value:.3g}") if math.isfinite(value) else 0.0


def _label_number(label: str):
    return int(label) if label.isdigit() else label


def atlas_columns(corpus: bool) -> tuple:
    """The atlas table's columns: ``ATLAS_COLUMNS``, with ``CORPUS_COLUMNS`` before the verdict when a corpus was read."""
    return ATLAS_COLUMNS[:-1] + CORPUS_COLUMNS + ATLAS_COLUMNS[-1:] if corpus else ATLAS_COLUMNS


def atlas_contexts(folder: str, window: int, ref, k: int = ATLAS_CONTEXTS, around: tuple[int, int] = ATLAS_SNIPPET
                   ) -> list[list]:
    """Per unit, its top ``k`` contexts from the sweep's corpus tables, each as ``[start, token refs, activations,
    max at]``: the snippet of ``around`` tokens about the window's highest token, from window position ``start``;
    the tokens as ``ref`` gives them (indices into the page's strings), activations to 3 digits, ``max at`` the
    highest token's index in the snippet. corpus.parquet is read one row group at a time, and only the windows
    named are read from corpus_windows.parquet."""
    file = pq.ParquetFile(os.path.join(folder, CORPUS_TABLES["corpus"][0]))
    picked: list[list] = []  # per unit: [window, start, stop, position, activations of the snippet]
    for group in range(file.num_row_groups):
        table = file.read_row_group(group, columns=["top_window", "top_position", "top_activations"])
        windows = pc.list_slice(table.column("top_window"), 0, k).to_pylist()
        positions = pc.list_slice(table.column("top_position"), 0, k).to_pylist()
        acts = pc.list_slice(table.column("top_activations"), 0, k).combine_chunks()
        values = acts.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, window)
        row = 0
        for unit_windows, unit_positions in zip(windows, positions):
            contexts = []
            for w, position in zip(unit_windows, unit_positions):
                start, stop = snippet(window, position, around)
                contexts.append([w, start, stop, position, values[row, start:stop]])
                row += 1
            picked.append(contexts)
    named = sorted({c[0] for contexts in picked for c in contexts})
    table = pq.read_table(os.path.join(folder, CORPUS_TABLES["corpus_windows"][0]), columns=["window", "tokens"],
                          filters=[("window", "in", named)]) if named else None
    if table is None or not len(table):
        return [[] for _ in picked]
    tokens = table.column("tokens").combine_chunks().flatten().dictionary_encode()
    refs = np.array([ref(t) for t in tokens.dictionary.to_pylist()], dtype=np.int64)[
        tokens.indices.to_numpy(zero_copy_only=False)].reshape(-1, window)
    row_of = {w: i for i, w in enumerate(table.column("window").to_pylist())}
    return [[[start, refs[row_of[w], start:stop].tolist(), [0 if a == 0 else _short(a) for a in values.tolist()],
              position - start] for w, start, stop, position, values in contexts]
            for contexts in picked]  # 0 as the integer 0: most of a sparse unit's activations in a context are 0


def atlas_data(folder: str, corpus: dict | None = None) -> dict:
    """The atlas page's data from the sweep's tables in ``folder``: per unit its table row, its seeds' decoded
    tokens (indices into a table of the distinct strings, shown with ``visible``) and their activations (3 digits),
    its top promoted tokens and its Neuronpedia link; with ``corpus`` (results.json's record of the corpus read) the
    corpus columns and each unit's top contexts (``atlas_contexts``). Read one block of rows at a time."""
    corpus = corpus if corpus and os.path.isfile(os.path.join(folder, CORPUS_TABLES["corpus"][0])) else None
    columns = atlas_columns(corpus is not None)
    units = read_units(folder, columns=["label", *(key for key, _, _, _ in columns[1:-1]), "promoted_tokens",
                                        "promoted_logits", "record"]).to_pydict()
    index: dict[str, int] = {}  # token -> its entry in ``shown``: ``visible`` runs once per distinct token

    def ref(token: str) -> int:
        if token not in index:
            index[token] = len(shown)
            shown.append(visible(token))
        return index[token]

    shown: list[str] = []
    tokens: list[list[int]] = []
    activations: list[list[float]] = []
    seeds: list[int] = []
    for block in iter_row_blocks(folder, columns=["unit", "seed", "tokens", "decoded_position_activations"]):
        block_columns = block.to_pydict()
        for unit, seed, row_tokens, row_acts in zip(block_columns["unit"], block_columns["seed"],
                                                    block_columns["tokens"],
                                                    block_columns["decoded_position_activations"]):
            if unit == len(tokens):
                tokens.append([])
                activations.append([])
            if unit == 0:
                seeds.append(seed)
            tokens[unit] += [ref(t) for t in row_tokens]
            activations[unit] += [_short(a) for a in row_acts]
    links = [neuronpedia_link(json.loads(r).get("neuronpedia")) if r else None for r in units["record"]]
    promoted = [None if names is None else [[ref(t), _short(v)] for t, v in zip(names, values)]
                for names, values in zip(units["promoted_tokens"], units["promoted_logits"])]
    rows = []
    for i in range(len(units["label"])):
        row = [_label_number(units["label"][i])] + [units[key][i] for key, _, _, _ in columns[1:-1]]
        rows.append(row + [verdict(units["null_p_value"][i])])
    data = {
        "columns": [{"key": key, "label": label, "kind": kind, "ascending": up} for key, label, kind, up in columns],
        "rows": rows, "links": links if any(links) else None, "seeds": seeds,
        "n_tokens": len(tokens[0]) // max(len(seeds), 1), "strings": shown, "tokens": tokens,
        "activations": activations, "promoted": promoted if any(p is not None for p in promoted) else None,
        "corpus": None,
    }
    if corpus is not None:
        data["corpus"] = {"window": corpus["window"], "bos": bool(corpus["bos_excluded"]),
                          "contexts": atlas_contexts(folder, corpus["window"], ref)}
    return data


def histogram(counts: list[int], width: int = 640, height: int = 240) -> dict:
    """The n_unique histogram as SVG bars: ``counts[k]`` units with n_unique k, one bar per value 1..n_total."""
    n_total = len(counts) - 1
    box = _axes_box(0.5, n_total + 0.5, 0, max(counts), width, height, pad=64)
    step = box["x"](1.5) - box["x"](0.5)
    bars = [{"x": box["x"](value - 0.5), "y": box["y"](units), "w": max(step - 1, 1),
             "h": box["y"](0) - box["y"](units), "tip": f"n_unique {value}: {units:,} unit{'s' * (units != 1)}"}
            for value, units in enumerate(counts) if value > 0 and units > 0]
    return {**box["frame"], "bars": bars, "x_label": f"unique tokens of {n_total}", "y_label": "units"}


def write_atlas_page(log_dir: str, results: AtlasResults) -> str:
    """Write ``report.html`` for a sweep: the most and least reproducible units, the n_unique histogram and the
    sortable, filterable table of every unit, from the sweep's tables in ``log_dir``."""
    common = os.path.commonprefix([row.target for row in results.most_reproducible + results.least_reproducible])
    return write_page(
        log_dir, "atlas.html.j2", f"amax_lightning atlas: {results.n_units} units", results=results,
        n_total=len(results.histogram) - 1,
        units_of=common[: len(common) - len(common.split(":")[-1])].rstrip(":") or results.target,
        histogram=histogram(results.histogram), data=atlas_data(log_dir, results.corpus), verdict=verdict,
        ranked=png_data_uri(os.path.join(log_dir, "atlas.png")), contexts=ATLAS_CONTEXTS, snippet=ATLAS_SNIPPET)


# --- study and sensitivity ---------------------------------------------------------------------------------------
def write_study_page(folder: str, rows: list[dict], columns: tuple[str, ...], complete: bool) -> str:
    """Write the study's ``report.html``: its table, each row linking to its run's page."""
    table = []
    for row in rows:
        run_page = os.path.join(os.path.dirname(row["results"]), "report.html")
        table.append({**row, "link": relative_link(run_page, folder) if os.path.isfile(run_page) else None})
    return write_page(folder, "study.html.j2", "amax_lightning study", rows=table,
                      columns=[c for c in columns if c != "results"], complete=complete)


def write_sensitivity_page(folder: str, document: dict, plot_titles: dict[str, str]) -> str:
    """Write the sensitivity study's ``report.html``: per target the verdict and tables, then the plots."""
    plots = [(title, png_data_uri(os.path.join(folder, f"{name}.png"))) for name, title in plot_titles.items()]
    return write_page(folder, "sensitivity.html.j2", "amax_lightning sensitivity study", targets=document["targets"],
                      plots=[(t, uri) for t, uri in plots if uri])
