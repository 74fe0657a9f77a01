"""report.html as written by the commands (no browser here: tests/e2e/test_report_browser.py opens them): hostile
token text stays text in HTML and markdown, the page allows only its own script, logit effects land in
results.json, the corpus's real text is shown as text on the run and atlas pages; the command line's help; a study
checks every fit first and keeps the table of finished fits."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html.parser import HTMLParser

import pytest
from conftest import TINY_TARGET, write_sae
from synthetic_sweep import HOSTILE_DOCUMENTS, write_hostile_corpus

from amax_lightning.__main__ import main

ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "main", "footer", "section", "h1", "h2",
                "h3", "p", "div", "span", "b", "br", "a", "label", "input", "select", "option", "table", "thead", "tbody", "tr", "th", "td",
                "figure", "figcaption", "img", "svg", "g", "line", "text", "polyline", "circle", "rect", "script", "button",
                "details", "summary"}


class Page(HTMLParser):
    """Every start tag with its attributes, and each script's type and text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self._script = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = [dict(attrs).get("type", "js"), ""]

    def handle_data(self, data):
        if self._script is not None:
            self._script[1] += data

    def handle_endtag(self, tag):
        if tag == "script" and self._script is not None:
            self.scripts.append(tuple(self._script))
            self._script = None


def fit(tmp_path, monkeypatch, model_dir, target=TINY_TARGET, *extra) -> dict:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--model.model_name_or_path", str(model_dir), "--model.target", target, "--seeds", "0-2",
          "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--results.null_samples", "200", *extra])
    versions = sorted((tmp_path / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return json.loads((versions[-1] / "results.json").read_text())


def assert_safe_page(path) -> Page:
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    tags = {tag for tag, _ in page.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    assert not [(tag, a) for tag, attrs in page.tags for a in attrs if a.startswith("on")]  # no event handlers
    assert not [a for tag, a in page.tags if a.get("id") == "pwned" or a.get("src") == "x"]
    executable = [body for kind, body in page.scripts if kind == "js"]
    assert len(executable) == 1 and all(kind in ("js", "application/json") for kind, _ in page.scripts)
    csp = next(a["content"] for tag, a in page.tags if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    digest = base64.b64encode(hashlib.sha256(executable[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp
    assert not re.search(r"src=\"(https?:)?//", text)  # nothing fetched
    assert not re.search(r"href=\"(https?:)?//(?!www\.neuronpedia\.org/)", text)  # links: Neuronpedia's only
    return page


def test_hostile_tokens_stay_text_in_html_and_markdown(hostile_gpt2_dir, tmp_path, monkeypatch):
    results = fit(tmp_path, monkeypatch, hostile_gpt2_dir)
    tokens = [t for run in results["runs"] for t in run["tokens"]]
    assert any(t.startswith(("<script>", "</script>", "</textarea>", "\"'><img")) for t in tokens + [
        e["token"] for e in results["logit_effects"]["promoted"] + results["logit_effects"]["suppressed"]])
    assert_safe_page(tmp_path / "lightning_logs/version_0/report.html")
    report = (tmp_path / "lightning_logs/version_0/report.md").read_text(encoding="utf-8")
    for line in report.splitlines():
        assert "<" not in line.replace("&lt;", "") and ">" not in line.replace("&gt;", "")
        if line.startswith("| ") and not line.startswith("| seed"):
            assert len(re.findall(r"(?<!\\)\|", line)) == 6  # a token's | does not split its cell
    sweep = fit(tmp_path, monkeypatch, hostile_gpt2_dir, "blocks.2.hook_resid_pre:0-2")
    page = assert_safe_page(tmp_path / "lightning_logs/version_1/report.html")
    data = json.loads(next(body for kind, body in page.scripts if kind == "application/json"))
    assert len(data["rows"]) == 3
    shown = [data["strings"][i] for i in data["tokens"][0]]
    from amax_lightning.analysis.tables import unit_record
    from amax_lightning.report.html import visible

    first = unit_record(str(tmp_path / "lightning_logs/version_1"), 0)
    assert sweep["n_units"] == 3 and shown == [visible(t) for run in first["runs"] for t in run["tokens"]]
    promoted = [data["strings"][i] for i, _ in data["promoted"][0]]
    assert promoted == [visible(e["token"]) for e in first["logit_effects"]["promoted"]]
    assert data["corpus"] is None and "corpus_max" not in [c["key"] for c in data["columns"]]  # no corpus read
    assert 'id="corpus' not in (tmp_path / "lightning_logs/version_1/report.html").read_text()
    assert 'id="corpus' not in (tmp_path / "lightning_logs/version_0/report.html").read_text()


def test_logit_effects_in_results_follow_the_formula(tiny_gpt2_dir, tiny_backbone, tmp_path, monkeypatch):
    results = fit(tmp_path, monkeypatch, tiny_gpt2_dir)
    column = tiny_backbone.model.wte.weight[:, 5].detach()
    effects = results["logit_effects"]
    assert [t["token_id"] for t in effects["promoted"]] == column.topk(10).indices.tolist()
    assert [t["token_id"] for t in effects["suppressed"]] == (-column).topk(10).indices.tolist()
    assert effects["ln_f_scale"] is False and effects["direction"].startswith("e_5")
    null, report = results["null_model"], (tmp_path / "lightning_logs/version_0/report.md").read_text()
    assert null["expected_n_unique_se"] > 0 and null["p_value_se"] == 0  # 15 of 15: p = 1 for every subset
    assert (f"expected {null['expected_n_unique']:.1f} ± {null['expected_n_unique_se']:.2g} unique of 15, p-value of "
            f"15 or fewer = 1\n") in report  # an error of 0 is not shown
    assert "logit_effects" not in fit(tmp_path, monkeypatch, tiny_gpt2_dir, "blocks.1.attn.hook_q:0.3")


def test_help_names_our_commands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: amax_lightning [-h] {fit,study,sensitivity} ...")
    assert all(f"\n  {name} " in out for name in ("fit", "study", "sensitivity")) and "validate" not in out
    for command in ("study", "sensitivity"):
        main([command, "--help"])
        assert capsys.readouterr().out.startswith(f"usage: amax_lightning {command} --config")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: amax_lightning [options] fit ")


@pytest.mark.parametrize("argv, message", [
    (["validate"], "'validate' is not a command; use one of fit, study, sensitivity"),
    (["predict", "--seed", "1"], "'predict' is not a command"),
    ([], "a command is needed: one of fit, study, sensitivity"),
])
def test_other_commands_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("amax_lightning: error: ") and message in err[-1]


STUDY = "targets: [blocks.2.hook_resid_pre:5, blocks.3.mlp.hook_post:7]\nvariants: [{}, {model.priors: clamp}]\n"


def test_study_checks_every_fit_before_the_first(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.yaml").write_text(STUDY)  # the tiny model has blocks 0..2: the second target is bad
    with pytest.raises(SystemExit) as exit_:
        main(["study", "--config", "study.yaml", "--model.model_name_or_path", str(tiny_gpt2_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert err[0] == ("amax_lightning: error: study fit blocks.3.mlp.hook_post:7 with none: target layer 3 is out of "
                      "range; this model has blocks 0..2")
    assert not (tmp_path / "lightning_logs").exists() and not (tmp_path / "studies").exists()
    (tmp_path / "study.yaml").write_text(STUDY.replace("clamp", "no_such_prior").replace("blocks.3", "blocks.1"))
    with pytest.raises(SystemExit):
        main(["study", "--config", "study.yaml", "--model.model_name_or_path", str(tiny_gpt2_dir)])
    assert "with priors=no_such_prior" in capsys.readouterr().err and not (tmp_path / "lightning_logs").exists()


def test_a_stopped_study_writes_the_table_of_its_finished_fits(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    import amax_lightning.commands.study as study

    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.yaml").write_text(STUDY.replace("blocks.3", "blocks.1"))
    real_run, calls = study.run_trainer, []

    def interrupted_third(args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(args)

    monkeypatch.setattr(study, "run_trainer", interrupted_third)
    with pytest.raises(SystemExit) as exit_:
        main(["study", "--config", "study.yaml", "--model.model_name_or_path", str(tiny_gpt2_dir), "--seeds", "0-1",
              "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--results.null_samples", "0"])
    assert exit_.value.code == 130
    table = (tmp_path / "studies/version_0/study.md").read_text()
    assert table.count("| blocks.") == 2 and "stopped early: these are the 2 rows of the fits it finished" in table
    page = (tmp_path / "studies/version_0/report.html").read_text()
    assert "stopped early" in page and page.count('href="../../lightning_logs/version_') == 2


def test_sae_pages_link_to_neuronpedia(tiny_gpt2_dir, tmp_path, monkeypatch):
    folder = write_sae(tmp_path / "sae", hook="blocks.2.hook_resid_pre")  # its cfg names neuronpedia id tiny/1-res
    results = fit(tmp_path, monkeypatch, tiny_gpt2_dir, f"sae:{folder}:3")
    assert results["logit_effects"]["direction"].startswith("W_dec[3]")
    page = assert_safe_page(tmp_path / "lightning_logs/version_0/report.html")
    assert ("a", {"href": "https://www.neuronpedia.org/tiny/1-res/3", "rel": "noopener noreferrer"}) in page.tags
    fit(tmp_path, monkeypatch, tiny_gpt2_dir, f"sae:{folder}:3,5")
    page = assert_safe_page(tmp_path / "lightning_logs/version_1/report.html")
    data = json.loads(next(body for kind, body in page.scripts if kind == "application/json"))
    assert data["links"] == ["https://www.neuronpedia.org/tiny/1-res/3", "https://www.neuronpedia.org/tiny/1-res/5"]


class Contexts(HTMLParser):
    """The "Real text" section's examples: per example, its tokens as (shown text, attributes)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.examples, self._token, self._inside = [], None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section":
            self._inside = attrs.get("id") == "corpus"
        elif self._inside and tag == "span" and "context" in classes:
            self.examples.append([])
        elif self._inside and tag == "span" and "tok" in classes:
            self._token = ["", attrs]

    def handle_data(self, data):
        if self._token is not None:
            self._token[0] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._token is not None:
            self.examples[-1].append(tuple(self._token))
            self._token = None
        elif tag == "section":
            self._inside = False


def corpus_options(tmp_path) -> dict:
    return {"corpus": str(write_hostile_corpus(tmp_path / "hostile.jsonl")), "corpus_tokens": 3000,
            "corpus_window": 16}


def test_real_text_section_shows_the_corpus_as_text_on_one_scale(fit_tiny, tmp_path):
    from amax_lightning.report.html import SNIPPET, diverging, fmt, snippet, symmetric_scale, visible

    _, results = fit_tiny(steps=5, seeds=[0, 1, 2], writer_options=corpus_options(tmp_path))
    corpus = results["corpus"]
    assert corpus["window"] == 16 and corpus["bos_excluded"] and len(corpus["top_examples"]) == 20
    path = tmp_path / "run" / "report.html"
    assert_safe_page(path)
    text = path.read_text(encoding="utf-8")
    section = text[text.index('<section id="corpus">'):text.index("</section>", text.index('<section id="corpus">'))]
    for raw in ("<script>alert", "<b id=pwned>", "<img src=x", "\u0000", "\u202e", "\u200f"):
        assert raw not in text  # every document is text, escaped; control and format characters are shown as ⟨U+..⟩
    assert "<b " not in section and "<img" not in section and "<script" not in section
    examples = [*corpus["top_examples"], *(e for g in reversed(corpus["quantiles"]) for e in g["examples"])]
    shown = Contexts(text).examples
    expected = []
    for e in examples:
        start, stop = snippet(len(e["tokens"]), e["position"])
        expected.append([visible(t) for t in e["tokens"][start:stop]])
    assert [[t for t, _ in example] for example in shown] == expected
    assert {"<", "script", "·&", "⟨U+0000⟩"} <= {t for example in expected for t in example}  # hostile text shown
    counted = [a for e in examples for a in e["activations"][max(snippet(len(e["tokens"]), e["position"])[0], 1):
                                                             snippet(len(e["tokens"]), e["position"])[1]]]
    runs = results["runs"]
    scale = symmetric_scale([a for r in runs for a in r["position_activations"] + r["decoded_position_activations"]]
                            + counted)
    assert f"<span>+{fmt(scale, 3)}</span>" in text  # the seeds' legend shows the one scale
    for e, tokens in zip(examples, shown):
        start, _ = snippet(len(e["tokens"]), e["position"], SNIPPET)
        for i, (_, attrs) in enumerate(tokens):
            position, value = start + i, e["activations"][start + i]
            assert attrs["data-tip"].startswith(f"position {position} · activation {fmt(value)}")
            assert ("max" in attrs["class"].split()) == (position == e["position"])
            if position == 0:  # the BOS: marked, grey, not counted
                assert "bos" in attrs["class"].split() and "--bg-dec: #eee" in attrs["style"]
                assert "not counted" in attrs["data-tip"] and "data-a" not in attrs
            else:
                assert f"--bg-dec: {diverging(value, scale)};" in attrs["style"]
    comparison = corpus["comparison"]
    assert f"{corpus['density'] * 100:.3g}% of the tokens are above 0" in section
    assert f"<b>{fmt(comparison['optimized_over_corpus_max'], 3)}×</b>" in section
    assert "None of the decoded tokens" in section or comparison["shared_tokens"]
    bars = re.findall(r'<rect class="barv"[^>]*data-tip="([^"]*)"', section)
    assert len(bars) == sum(1 for n in corpus["histogram"]["counts"] if n) and bars
    assert section.count('<details class="group"') == len(corpus["quantiles"])
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    lines = [line for line in report.splitlines() if line.startswith(("real text:", "optimized beside real text:"))]
    assert len(lines) == 2 and f"highest {corpus['max']:.4g}" in lines[0]
    assert f"({comparison['optimized_over_corpus_max']:.3g}x real text's)" in lines[1]
    for line in lines:
        assert "<" not in line.replace("&lt;", "") and ">" not in line.replace("&gt;", "")


def test_atlas_shows_corpus_columns_and_each_units_top_contexts(fit_tiny, tmp_path):
    from amax_lightning.report.html import ATLAS_SNIPPET, snippet, visible

    _, sweep = fit_tiny("sweep", steps=3, target="blocks.2.hook_resid_pre:0-3", seeds=[0, 1],
                        writer_options=corpus_options(tmp_path))
    path = tmp_path / "sweep" / "report.html"
    page = assert_safe_page(path)
    text = path.read_text(encoding="utf-8")
    for raw in ("<script>alert", "<b id=pwned>", "<img src=x", "\u0000", "\u202e"):
        assert raw not in text
    assert 'id="corpus-source"' in text and 'data-range="corpus_density"' in text
    data = json.loads(next(body for kind, body in page.scripts if kind == "application/json"))
    keys = [c["key"] for c in data["columns"]]
    assert keys[-4:] == ["corpus_max", "corpus_density", "optimized_over_corpus_max", "verdict"]
    assert data["corpus"]["window"] == 16 and data["corpus"]["bos"] is True
    for u, unit in enumerate(sweep["units"]):
        row = next(a for a in sweep["atlas"] if a["unit"] == u)
        assert data["rows"][u][keys.index("corpus_max")] == row["corpus_max"] == unit["corpus"]["max"]
        assert data["rows"][u][keys.index("corpus_density")] == row["corpus_density"]
        contexts = data["corpus"]["contexts"][u]
        assert len(contexts) == 3
        for (start, refs, acts, at), example in zip(contexts, unit["corpus"]["top_examples"]):
            first, stop = snippet(16, example["position"], ATLAS_SNIPPET)
            assert start == first and at == example["position"] - first
            assert [data["strings"][i] for i in refs] == [visible(t) for t in example["tokens"][first:stop]]
            assert acts == [0 if a == 0 else float(f"{a:.3g}") for a in example["activations"][first:stop]]
    assert not [document for document in HOSTILE_DOCUMENTS if len(document) > 2 and document in text]
