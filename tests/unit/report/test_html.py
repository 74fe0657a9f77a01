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
