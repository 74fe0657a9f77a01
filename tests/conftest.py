"""Shared fixtures: tiny models saved to temp folders (random init, real GPT-2 tokenizer), ``fit_tiny`` (an
in-process fit) and a CLI runner. Tiers: ``unit`` (no Trainer), ``integration`` (in-process fits), ``e2e``
(subprocesses, signals, DDP; marked ``slow``, which every test under ``tests/e2e`` gets automatically).

The suite runs on pytest-xdist workers (``-n auto`` in pyproject.toml, at most ``MAX_WORKERS``); the cores are
shared out among them (``OMP_NUM_THREADS``, which the CLI subprocesses inherit), so workers never fight over them.
``-n 0`` runs it in one process."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: the suite never touches the network
os.environ["AMAX_LIGHTNING_CACHE"] = tempfile.mkdtemp(prefix="amax-cache-")  # never the user's cache
MAX_WORKERS = 4  # each worker holds torch, transformers and Lightning (about 0.7 GB) and starts CLI subprocesses
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:  # before torch is imported: its threads, this worker's share
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import pytest  # noqa: E402  (after the environment above)
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, LlamaConfig, LlamaModel  # noqa: E402

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "gpt2_tokenizer"
REPO = Path(__file__).resolve().parents[1]
TINY_TARGET = "blocks.2.hook_resid_pre:5"


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most ``MAX_WORKERS``."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_collection_modifyitems(config, items):
    """Every e2e test is ``slow``. The SLURM tests, which one worker runs in turn (``xdist_group``), go first, so
    the other workers share out the rest meanwhile instead of waiting for them at the end."""
    for item in items:
        if "e2e" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)  # stable: otherwise as collected


def pytest_collection_finish(session):
    """The test modules have imported torch, transformers and Lightning: keep their millions of long-lived objects
    out of every later garbage collection (``gc.freeze``), as ``python -m amax_lightning`` does. Garbage that tests
    make is still collected."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection inside a test fails loudly."""

    def refuse(*args, **kwargs):
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tiny_gpt2_config(**overrides) -> GPT2Config:
    """A 3-block GPT-2 with 64-dim residual and GPT-2's real vocabulary size; dropout left at GPT-2's 0.1."""
    kwargs = dict(n_layer=3, n_embd=64, n_head=4, n_positions=32, vocab_size=50257)
    return GPT2Config(**{**kwargs, **overrides})


def save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    GPT2Tokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """Folder with a random-init tiny GPT-2 LM (saved with its head, as users' checkpoints are) + tokenizer."""
    torch.manual_seed(1234)
    return save_model(GPT2LMHeadModel(tiny_gpt2_config()), tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Folder with a random-init tiny Llama (a non-GPT-2 model: the generic forward path)."""
    torch.manual_seed(4321)
    config = LlamaConfig(
        num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=50257, max_position_embeddings=32,
    )
    return save_model(LlamaModel(config), tmp_path_factory.mktemp("tiny_llama"))


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """Run ``python -m amax_lightning <args>`` in a subprocess, offline, and return the completed process."""
    Path(cwd).mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), **env}
    return subprocess.run(
        [sys.executable, "-m", "amax_lightning", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def run_in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m amax_lightning <args>`` in this process, in ``cwd``: the same path as ``run_cli`` after the
    interpreter's start, without its ~5 s of imports. For the one-process references that subprocess runs are compared
    with; stdout and stderr are captured, a SystemExit becomes the return code, and a relative results path printed
    last is made absolute."""
    from amax_lightning.__main__ import main

    Path(cwd).mkdir(parents=True, exist_ok=True)
    out, err, code, here = io.StringIO(), io.StringIO(), 0, os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
    lines = out.getvalue().rstrip("\n").split("\n")
    if code == 0 and lines[-1].endswith("results.json") and not os.path.isabs(lines[-1]):
        lines[-1] = str(Path(cwd) / lines[-1])
    return subprocess.CompletedProcess(["amax_lightning", *args], code, "\n".join(lines) + "\n", err.getvalue())


@pytest.fixture(scope="session")
def tiny_backbone(tiny_gpt2_dir):
    """The tiny GPT-2 loaded once; frozen and always in eval mode, so fits can share it."""
    from amax_lightning.model.backbone import load_backbone

    return load_backbone(str(tiny_gpt2_dir))


@pytest.fixture
def tiny_module(tiny_gpt2_dir, tiny_backbone):
    """``tiny_module(fresh=False, **options)``: an ActMaxModule on the shared tiny GPT-2 (target ``TINY_TARGET``,
    seeds 0-2 unless given); no Trainer. ``fresh`` loads its own backbone, for runs that change its dtype."""
    from amax_lightning.lightning.module import ActMaxModule
    from amax_lightning.model.backbone import load_backbone

    def make(fresh: bool = False, **options):
        options = {"target": TINY_TARGET, "seeds": [0, 1, 2], **options}
        backbone = load_backbone(str(tiny_gpt2_dir)) if fresh else tiny_backbone
        return ActMaxModule(model_name_or_path=str(tiny_gpt2_dir), backbone=backbone, **options)

    return make


def sweep_view(results_path: str, results: dict) -> dict:
    """A sweep's results.json with its tables read back (``targets``, ``atlas`` rows, ``units`` as
    ``analysis.tables.unit_record`` gives them); a one-unit results.json unchanged."""
    if "tables" not in results:
        return results
    from amax_lightning.analysis.tables import read_units, unit_record

    folder = os.path.dirname(results_path)
    atlas = read_units(folder).to_pylist()
    return {**results, "targets": [row["target"] for row in atlas], "atlas": atlas,
            "units": [unit_record(folder, i) for i in range(results["n_units"])]}


@pytest.fixture
def fit_tiny(tiny_module, tmp_path):
    """``fit_tiny(name, steps=.., precision=.., callbacks=.., null_samples=.., **module_options)``: an in-process
    ``Trainer.fit`` of ActMaxModule on the tiny GPT-2 in ``tmp_path / name``; returns (module, results.json)."""
    from lightning.pytorch import Trainer

    from amax_lightning.lightning.callbacks import ResultsWriter, find_callback

    def fit(name: str = "run", steps: int = 20, precision: str = "32-true", callbacks=(), null_samples: int = 200,
            trainer_options: dict | None = None, writer_options: dict | None = None, fit_options: dict | None = None,
            **module_options):
        module = tiny_module(fresh=precision == "64-true", **module_options)  # 64-true casts the backbone
        trainer = Trainer(**{
            "max_steps": steps, "accelerator": "cpu", "devices": 1, "precision": precision, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": tmp_path / name,
            "callbacks": [ResultsWriter(null_samples=null_samples, **(writer_options or {})), *callbacks],
            **(trainer_options or {})})
        trainer.fit(module, **(fit_options or {}))
        writer = find_callback(trainer, ResultsWriter)
        with open(writer.results_path) as handle:
            return module, sweep_view(writer.results_path, json.load(handle))

    return fit


def write_sae(folder: Path, generation: str = "6.x", hook: str = "blocks.1.hook_resid_pre", d_in: int = 64,
              d_sae: int = 32, seed: int = 0, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A random standard SAE in SAELens's on-disk format, its cfg.json in the layout of ``generation``."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
               "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g) * 0.1}
    weights.update(tensors or {})
    if generation == "pre-5":
        cfg = {"hook_point": hook, "hook_point_layer": 1, "d_in": d_in, "context_size": 128}
    elif generation == "5.x":
        cfg = {"hook_name": hook, "hook_layer": 1, "d_in": d_in, "d_sae": d_sae, "architecture": "standard",
               "apply_b_dec_to_input": True, "normalize_activations": "none", "neuronpedia_id": "tiny/1-res"}
    else:
        cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "architecture": "standard",
               "apply_b_dec_to_input": True, "normalize_activations": "none",
               "metadata": {"sae_lens_version": "6.5.0", "hook_name": hook, "prepend_bos": True,
                            "neuronpedia_id": "tiny/1-res"}}
    cfg.update(config or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    return folder


HOSTILE_TOKENS = (
    "<script>alert(1)</script>", "</script><script>alert(2)</script>", "\"'><img src=x onerror=alert(3)>",
    "</textarea></style><b id=pwned>x</b>", "a|b|c", "line\nbreak", "\u0000nul", "\u202eevil\u200f", "😀 emoji",
    "*bold* _it_ [link](javascript:alert(4))", "{{ 7*7 }}{% raw %}", "&amp; &lt;", "`code`", "\\", "",
)


def hostile_vocabulary(size: int = 50257) -> dict[str, int]:
    """A GPT-2 byte-level vocabulary whose tokens decode to ``HOSTILE_TOKENS`` (each with its id appended), and
    every 16th to a lone UTF-8 lead byte (a byte-fallback piece, decoded as U+FFFD); the last is <|endoftext|>."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # GPT-2 shows these bytes as chr(256 + n), in order
    as_unicode = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    vocab = {}
    for i in range(size - 1):
        raw = bytes([0xE2, 0x30 + i % 10]) if i % 16 == 15 else HOSTILE_TOKENS[i % len(HOSTILE_TOKENS)].encode()
        key = "".join(as_unicode[b] for b in raw + f"#{i}".encode())
        vocab[key] = i
    vocab["<|endoftext|>"] = size - 1
    return vocab


@pytest.fixture(scope="session")
def hostile_gpt2_dir(tmp_path_factory) -> Path:
    """The tiny GPT-2 with a tokenizer whose every token is hostile text (markup, quotes, control and bidi
    characters, emoji, byte-fallback pieces): reports must show them as text."""
    torch.manual_seed(1234)
    source = tmp_path_factory.mktemp("hostile_tokenizer")
    (source / "vocab.json").write_text(json.dumps(hostile_vocabulary()), encoding="utf-8")
    (source / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    folder = tmp_path_factory.mktemp("hostile_gpt2")
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(folder)
    GPT2Tokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-host SLURM (``tests/e2e/slurm_cluster.py``), shared by the session's cluster tests and stopped
    at its end. Where it cannot run, the tests skip with the reason, or fail when ``AMAX_REQUIRE_SLURM=1`` (CI)."""
    sys.path.insert(0, str(Path(__file__).parent / "e2e"))
    from slurm_cluster import SlurmCluster, why_not_available

    reason = why_not_available()
    if reason is not None:
        if os.environ.get("AMAX_REQUIRE_SLURM") == "1":
            pytest.fail(f"AMAX_REQUIRE_SLURM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
