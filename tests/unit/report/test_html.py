"""The report pages' text and colour helpers, and markdown escaping, against hand-computed values."""

from __future__ import annotations

import pytest

from amax_lightning.report.html import diverging, ink, neuronpedia_link, nice_ticks, quoted, relative_link, visible
from amax_lightning.report.markdown import markdown_cell, markdown_token


@pytest.mark.parametrize("token, shown", [
    (" the", "·the"), ("a b", "a b"), ("the ", "the·"), ("", "∅"), ("\n", "↵"), ("x\ty", "x⇥y"),
    ("\u0000nul", "⟨U+0000⟩nul"), ("\u202eevil\u200f", "⟨U+202E⟩evil⟨U+200F⟩"), ("😀", "😀"),
    ("<script>", "<script>"),  # escaping is the template's job
])
def test_visible(token, shown):
    assert visible(token) == shown


def test_diverging_scale_ends_and_middle():
    assert diverging(0.0, 2.0) == "rgb(255, 255, 255)"
    assert diverging(2.0, 2.0) == diverging(5.0, 2.0) == "rgb(178, 24, 43)"
    assert diverging(-2.0, 2.0) == "rgb(33, 102, 172)"
    assert diverging(1.0, 2.0) == f"rgb({round(255 + 0.5 * (178 - 255))}, {round(255 + 0.5 * (24 - 255))}, " \
                                  f"{round(255 + 0.5 * (43 - 255))})"
    assert diverging(float("nan"), 2.0) == diverging(1.0, 0.0) == "rgb(255, 255, 255)"
    assert ink(1.9, 2.0) == "#fff" and ink(0.5, 2.0) == "#111"


def test_nice_ticks():
    assert nice_ticks(0.5, 50.5) == [10, 20, 30, 40, 50]
    assert nice_ticks(2.31, 2.87) == [2.4, 2.5, 2.6, 2.7, 2.8]
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_quoted_escapes_controls_and_bidi():
    assert quoted('a"\n\u0000') == '"a\\"\\n\\u0000"'
    assert quoted("\u202ex") == '"\\u202ex"'


def test_links():
    assert neuronpedia_link("https://www.neuronpedia.org/gpt2-small/8-res-jb/91") is not None
    assert neuronpedia_link("javascript:alert(1)") is None and neuronpedia_link(None) is None
    assert relative_link("/a/runs/v 1/report.html", "/a/studies/version_0") == "../../runs/v%201/report.html"


@pytest.mark.parametrize("token, cell", [
    ("</textarea></style><b id=pwned>x</b>", '"&lt;/textarea&gt;&lt;/style&gt;&lt;b id=pwned&gt;x&lt;/b&gt;"'),
    ("a|b", '"a\\|b"'),
    ("*x* _y_ [l](j) `c` ~~s~~", '"\\*x\\* \\_y\\_ \\[l\\](j) \\`c\\` \\~\\~s\\~\\~"'),
    ("line\nbreak", '"line\\\\nbreak"'),  # JSON's \n, its backslash escaped for markdown
    ("&amp;", '"&amp;amp;"'),
])
def test_markdown_token(token, cell):
    assert markdown_token(token) == cell
    assert "\n" not in markdown_cell("a\nb\rc")


def test_snippet_and_percent():
    from amax_lightning.report.html import percent, snippet

    assert snippet(128, 60) == (36, 69) and snippet(128, 3) == (0, 12) and snippet(16, 15, (8, 3)) == (7, 16)
    assert percent(0.7304) == "73%" and percent(0.000122) == "0.0122%" and percent(None) == "-"


def test_context_rows_mark_the_bos_frame_the_max_and_colour_the_rest():
    from amax_lightning.analysis.corpus_results import CorpusExample
    from amax_lightning.report.html import context_rows, snippet_values

    example = CorpusExample([50256, 1, 2, 3], ["<|endoftext|>", "<b>", " &", "\u202e"], [40.0, -1.0, 2.0, 0.5], 2.0, 2)
    assert snippet_values([example], True) == [-1.0, 2.0, 0.5]  # the BOS's 40 is not counted
    (row,) = context_rows([example], True, 2.0)
    assert [t["text"] for t in row["tokens"]] == example.tokens and not row["cut_before"] and not row["cut_after"]
    assert [t["framed"] for t in row["tokens"]] == [False, False, True, False]
    assert row["tokens"][0]["bos"] and row["tokens"][0]["colour"] == "#eee"
    assert [t["colour"] for t in row["tokens"][1:]] == [diverging(a, 2.0) for a in (-1.0, 2.0, 0.5)]
    assert row["window"] == "<|endoftext|><b> &⟨U+202E⟩"
    (cut,) = context_rows([example], True, 2.0, around=(0, 0))
    assert [t["position"] for t in cut["tokens"]] == [2] and cut["cut_before"] and cut["cut_after"]


def test_atlas_contexts_are_each_units_top_3_snippets(tmp_path):
    import json

    from synthetic_sweep import write_synthetic_sweep

    from amax_lightning.analysis.corpus_tables import read_corpus_record
    from amax_lightning.report.html import ATLAS_SNIPPET, atlas_data, snippet

    vocab = [f"t{i}" for i in range(300)] + ["<script>", "\u0000"]
    results = write_synthetic_sweep(tmp_path, 5, vocab, seeds=2, tokens=3, corpus_windows=40, window=32)
    data = atlas_data(str(tmp_path), results.corpus)
    meta = json.loads((tmp_path / "results.json").read_text())["corpus"]
    assert data["corpus"]["window"] == 32 and len(data["corpus"]["contexts"]) == 5
    for unit, contexts in enumerate(data["corpus"]["contexts"]):
        record = read_corpus_record(str(tmp_path), unit, meta)
        assert len(contexts) == 3
        for (start, refs, acts, at), example in zip(contexts, record["top_examples"]):
            first, stop = snippet(32, example["position"], ATLAS_SNIPPET)
            assert (start, at) == (first, example["position"] - first)
            assert [data["strings"][i] for i in refs] == [visible(t) for t in example["tokens"][first:stop]]
            assert acts == [0 if a == 0 else float(f"{a:.3g}") for a in example["activations"][first:stop]]
    keys = [c["key"] for c in data["columns"]]
    assert keys[-4:] == ["corpus_max", "corpus_density", "optimized_over_corpus_max", "verdict"]
    plain = write_synthetic_sweep(tmp_path / "plain", 5, vocab, seeds=2, tokens=3, corpus_windows=0)
    assert plain.corpus is None and atlas_data(str(tmp_path / "plain"), plain.corpus)["corpus"] is None
