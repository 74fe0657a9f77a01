"""report.html at scale, and the screenshots in docs/.

Sizes and speed (synthetic results; real GPT-2 token strings): the page of a 10-seed x 5-token run with a corpus
record of 128-token windows (20 top examples, 10 quantile groups of 5), and of a 768-unit and a 24,576-unit atlas (10
seeds x 5 tokens per unit, and each unit's top 3 corpus windows unless ``--corpus-windows 0``; its tables from
``tests/synthetic_sweep.py``). Each atlas page is opened in headless Chromium
(``tests/browser.py``), ``--repeats`` times: the time from ``driver.get`` to the first rows painted (load, the
embedded JSON parsed, the first page of rows drawn, then two animation frames), and the time to sort a column by a
header click (the sort and redraw, then two frames), the median of 5 columns. Goals: a run's page under 1 MB, the
24,576-unit page under 40 MB, open within 3 s, a sort within 1 s.

``--screenshots docs`` also runs the real commands on a random-init tiny GPT-2 (3 blocks, 64 wide, GPT-2's real
tokenizer) and saves one screenshot of each page kind: run, EPO run, atlas, study and sensitivity study.

    python benchmarks/report_pages.py [--units 768,24576] [--repeats 3] [--corpus-windows 8192] [--screenshots docs]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser import page_problems, start_chromium  # noqa: E402
from synthetic_sweep import write_synthetic_sweep  # noqa: E402

from amax_lightning.analysis.corpus_results import (  # noqa: E402
    CorpusComparison,
    CorpusExample,
    CorpusResult,
    QuantileGroup,
)
from amax_lightning.analysis.null_model import NullModelResult  # noqa: E402
from amax_lightning.analysis.results import (  # noqa: E402
    NearToken,
    Reproducibility,
    SeedRun,
    Uniqueness,
    UnitResults,
)
from amax_lightning.report.html import write_atlas_page, write_unit_page  # noqa: E402

SEEDS, TOKENS = 10, 5
WINDOW, TOP, GROUPS, PER_GROUP = 128, 20, 10, 5  # the corpus pass's defaults


def synthetic_corpus(vocab: list[str], rng: random.Random, optimized_max: float) -> CorpusResult:
    """A corpus record of the default shape: random windows, sparse activations, a BOS at each window's start."""
    def example(high: float, position: int | None = None) -> CorpusExample:
        ids = [50256] + [rng.randrange(len(vocab)) for _ in range(WINDOW - 1)]
        acts = [rng.uniform(20, 60)] + [max(rng.gauss(0, 1) - 1, 0) * high / 4 for _ in range(WINDOW - 1)]
        at = position if position is not None else rng.randrange(1, WINDOW)
        acts[at] = high
        return CorpusExample(ids, [vocab[i] for i in ids], acts, max(acts[1:]), at)

    top = [example(8 * 0.98 ** k) for k in range(TOP)]
    groups = [QuantileGroup(g * 0.8, (g + 1) * 0.8, 0.3 / (g + 1), [example((g + 0.5) * 0.8) for _ in range(PER_GROUP)])
              for g in range(GROUPS)]
    edges = [k * 0.1 for k in range(81)]
    return CorpusResult(
        source="NeelNanda/pile-10k", n_tokens=1_000_000, n_windows=7875, window=WINDOW, bos_excluded=True,
        density=0.042, density_threshold=0.0, max=top[0].max, histogram={"edges": edges, "counts": [
            int(4000 * 0.93 ** k) for k in range(80)]}, top_examples=top, quantiles=groups,
        top_token_ids=[e.token_ids[e.position] for e in top], top_tokens=[e.tokens[e.position] for e in top],
        comparison=CorpusComparison(5.0, optimized_max, 2.0, 4.0, top[0].max, optimized_max / top[0].max, [], []))


def vocabulary() -> list[str]:
    """GPT-2's token strings, decoded as the reports show them (from the test fixture's vocab.json)."""
    encoder = json.loads((REPO / "tests/fixtures/gpt2_tokenizer/vocab.json").read_text(encoding="utf-8"))
    from transformers import GPT2Tokenizer

    tokenizer = GPT2Tokenizer.from_pretrained(REPO / "tests/fixtures/gpt2_tokenizer")
    return [tokenizer.convert_tokens_to_string([token]) for token in sorted(encoder, key=encoder.get)]


def synthetic_unit(target: str, vocab: list[str], rng: random.Random) -> UnitResults:
    """A plausible run of one unit: random tokens, activations and cosines of the real shapes."""
    runs, ids_all = [], []
    for seed in range(SEEDS):
        ids = [rng.randrange(len(vocab)) for _ in range(TOKENS)]
        ids_all += ids
        optimized = [rng.gauss(5, 2) for _ in range(TOKENS)]
        decoded = [a * rng.uniform(0.1, 0.6) for a in optimized]
        runs.append(SeedRun(
            seed=seed, token_ids=ids, tokens=[vocab[i] for i in ids], cosine=[rng.uniform(0.05, 0.3)] * TOKENS,
            final_activation=sum(optimized) / TOKENS, position_activations=optimized,
            decoded_activation=sum(decoded) / TOKENS, decoded_position_activations=decoded,
            decoded_gap=(sum(optimized) - sum(decoded)) / TOKENS, embedding_norm=[3.1] * TOKENS,
            nearest=[[NearToken(j, vocab[j], rng.uniform(0.05, 0.3)) for j in rng.sample(range(len(vocab)), 5)]
                     for _ in range(TOKENS)]))
    unique = sorted(set(ids_all))
    counts = [ids_all.count(i) for i in unique]
    return UnitResults(
        model="gpt2", target=target, aggregate="mean", priors=[], n_tokens=TOKENS, steps=500, partial=False, lr=1e-3,
        l2=0.0, seeds=list(range(SEEDS)), init_scale=0.14, vocab_norm=3.96,
        numerics={"precision": "32-true"}, runs=runs,
        uniqueness=Uniqueness(SEEDS * TOKENS, len(unique), unique, counts, [vocab[i] for i in unique]),
        reproducibility=Reproducibility([0.1] * TOKENS, 0.1, 0.0, 0.02, [[1.0] * SEEDS] * SEEDS, 0.15, 2.0, 3.1,
                                        [1.5, 6.3]),
        null_model=NullModelResult(SEEDS * TOKENS, 20_000, 49.2, len(unique), 0.3, 10_000, 0.005, 0.05),
        corpus=synthetic_corpus(vocab, rng, max(a for run in runs for a in run.position_activations)))


def open_and_sort(driver, path: Path) -> tuple[float, float]:
    """Seconds to the first rows painted, and the median seconds of a column sort (sort, redraw, paint)."""
    two_frames = ("var done = arguments[arguments.length - 1];"
                  "requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now())));")
    page_problems(driver)
    start = time.perf_counter()
    driver.get(f"file://{path}")
    driver.execute_async_script(two_frames)
    opened = time.perf_counter() - start
    assert driver.execute_script("return document.querySelectorAll('#atlas tbody tr.unit').length") == 100
    assert page_problems(driver) == [], "the page logged an error or fetched something"
    sorts = []
    for key in (2, 3, 4, 0, 1):
        begin = driver.execute_script(f"var t = performance.now(); document.querySelector(\"#atlas th[data-key='{key}']\")"
                                      ".click(); return t;")
        sorts.append((driver.execute_async_script(two_frames) - begin) / 1000)
    return opened, statistics.median(sorts)


def measure(units_list: list[int], repeats: int, corpus_windows: int) -> list[dict]:
    vocab, rng, rows = vocabulary(), random.Random(0), []
    folder = Path(tempfile.mkdtemp(prefix="amax-pages-"))
    unit = synthetic_unit("blocks.8.hook_resid_pre:91", vocab, rng)
    os.makedirs(folder / "run")
    import torch

    from amax_lightning.report.markdown import summary_markdown, write_report

    history = torch.cumsum(torch.rand(500, SEEDS), 0) / 100
    write_report(str(folder / "run"), unit, summary_markdown(unit), list(range(1, 501)), history, list(range(SEEDS)))
    page = write_unit_page(str(folder / "run"), unit)
    rows.append({"page": "run, 10 seeds x 5 tokens, corpus", "bytes": os.path.getsize(page)})
    driver = start_chromium()
    try:
        for n in units_list:
            atlas = write_synthetic_sweep(folder / f"atlas_{n}", n, vocab, corpus_windows=corpus_windows)
            start = time.perf_counter()
            page = write_atlas_page(str(folder / f"atlas_{n}"), atlas)
            written = time.perf_counter() - start
            timings = [open_and_sort(driver, Path(page)) for _ in range(repeats)]
            rows.append({"page": f"atlas, {n:,} units" + (", corpus" if corpus_windows else ""), "bytes": os.path.getsize(page), "write_s": written,
                         "open_s": statistics.median(t[0] for t in timings),
                         "sort_s": statistics.median(t[1] for t in timings)})
    finally:
        driver.quit()
    return rows


def screenshots(out: Path) -> None:
    """Run each command on a random-init tiny GPT-2 and save one screenshot per page kind into ``out``."""
    import torch
    from conftest import save_model, tiny_gpt2_config
    from transformers import GPT2LMHeadModel

    from amax_lightning.__main__ import main

    work = Path(tempfile.mkdtemp(prefix="amax-shots-"))
    torch.manual_seed(1234)
    model = save_model(GPT2LMHeadModel(tiny_gpt2_config()), work / "tiny-gpt2")
    (work / "text.txt").write_text((REPO / "README.md").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    os.chdir(work)
    common = ["--model.model_name_or_path", str(model), "--trainer.enable_progress_bar", "false"]
    main(["fit", "--model.target", "blocks.2.hook_resid_pre:5", "--trainer.max_steps", "100", "--model.lr", "0.01",
          "--results.baseline_top_k", "20", "--results.corpus", "text.txt", "--results.corpus_window", "32", *common])
    main(["fit", "--model.target", "blocks.2.hook_resid_pre:5", "--trainer.max_steps", "20", "--model.method", "epo",
          "--seeds", "0-3", *common])
    main(["fit", "--model.target", "blocks.2.hook_resid_pre:*", "--trainer.max_steps", "50", "--model.lr", "0.01",
          "--results.corpus", "text.txt", "--results.corpus_window", "32", *common])
    (work / "study.yaml").write_text("targets: [blocks.2.hook_resid_pre:5, blocks.1.mlp.hook_post:7]\n"
                                     "variants: [{}, {model.priors: clamp}]\n")
    main(["study", "--config", "study.yaml", "--trainer.max_steps", "50", *common])
    (work / "s.yaml").write_text("targets: [blocks.2.hook_resid_pre:5]\nseeds: 0-3\nsizes: [0, 1.0e-6, 1.0e-3, 0.1]\n"
                                 "replicas: 2\nsnapshots: [50, 100]\nnumerics: [64-true]\n")
    main(["sensitivity", "--config", "s.yaml", *common])
    pages = {"report_run.png": "lightning_logs/version_0", "report_real_text.png": "lightning_logs/version_0",
             "report_epo.png": "lightning_logs/version_1",
             "report_atlas.png": "lightning_logs/version_2", "report_study.png": "studies/version_0",
             "report_sensitivity.png": "sensitivity/version_0"}
    driver = start_chromium(width=1280, height=1100)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, folder in pages.items():
            page_problems(driver)
            driver.get(f"file://{work / folder / 'report.html'}")
            if name == "report_atlas.png":
                driver.find_element("css selector", "#atlas tbody tr.unit").click()
            if name == "report_epo.png":
                driver.execute_script("document.getElementById('pareto').scrollIntoView()")
            if name == "report_real_text.png":
                driver.execute_script("document.getElementById('corpus').scrollIntoView()")
            assert page_problems(driver) == [], name
            driver.save_screenshot(str(out / name))
            print(out / name, flush=True)
    finally:
        driver.quit()


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", default="768,24576", help="atlas sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus-windows", type=int, default=8192,
                        help="windows of the atlases' synthetic corpus tables (0: a sweep without a corpus)")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for one screenshot per page kind")
    args = parser.parse_args()
    rows = measure([int(n) for n in args.units.split(",") if n], args.repeats, args.corpus_windows)
    print(f"{'page':<36} {'size':>10} {'write':>8} {'open':>8} {'sort':>8}")
    for row in rows:
        size = f"{row['bytes'] / 1e6:.2f} MB"
        extra = [f"{row[k]:.2f} s" if k in row else "-" for k in ("write_s", "open_s", "sort_s")]
        print(f"{row['page']:<36} {size:>10} " + " ".join(f"{e:>8}" for e in extra))
    if args.screenshots:
        screenshots(args.screenshots.resolve())


if __name__ == "__main__":
    main_()
