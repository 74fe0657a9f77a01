"""Hostile input, in process: every case ends with one line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TARGET, write_sae
from lightning.pytorch import Trainer

from amax_lightning.__main__ import main
from amax_lightning.lightning.module import ActMaxModule


@pytest.fixture(scope="module")
def bad(tiny_gpt2_dir, tiny_backbone, tmp_path_factory) -> dict[str, str]:
    """Damaged files and folders, made once, outside the folder each case runs in."""
    root = tmp_path_factory.mktemp("hostile")
    files = {
        "malformed.yaml": "model: {n_tokens: [1, 2\n  lr: : :\n",
        "list.yaml": "- 1\n- 2\n",
        "wrong_types.yaml": "model:\n  n_tokens: five\n",
        "unknown_key.yaml": "model:\n  no_such_option: 1\n",
        "bad_seeds.yaml": "seeds: 9-0\n",
        "corrupted.ckpt": "\x00\x01 this is not a checkpoint",
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    torch.save({"hello": torch.zeros(1)}, root / "foreign.ckpt")
    torch.save({"state_dict": {"parameter": torch.zeros(1)}, "x": Path("/")}, root / "unsafe.ckpt")

    module = ActMaxModule(model_name_or_path=str(tiny_gpt2_dir), target=TINY_TARGET, seeds=[5], backbone=tiny_backbone)
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root / "run")
    trainer.fit(module)
    trainer.save_checkpoint(root / "other_seeds.ckpt")

    for name, drop in [("no_weights", "model.safetensors"), ("no_tokenizer", "tokenizer.json"),
                       ("damaged_weights", None)]:
        shutil.copytree(tiny_gpt2_dir, root / name)
        if drop:
            (root / name / drop).unlink()
            if drop == "tokenizer.json":
                (root / name / "tokenizer_config.json").unlink()
    weights = root / "damaged_weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    write_sae(root / "sae_ok")
    write_sae(root / "sae_gated", config={"architecture": "gated"})
    write_sae(root / "sae_wide", config={"d_in": 60},
              tensors={"W_enc": torch.zeros(60, 32), "b_dec": torch.zeros(60), "W_dec": torch.zeros(32, 60)})
    write_sae(root / "sae_nan", tensors={"b_enc": torch.full((32,), float("nan"))})
    write_sae(root / "sae_nan_decoder", tensors={"W_dec": torch.full((32, 64), float("nan"))})
    (write_sae(root / "sae_no_weights") / "sae_weights.safetensors").unlink()  # cfg.json alone
    write_sae(root / "sae_hook9", hook="blocks.9.hook_resid_pre")
    for name in ("sae_truncated", "sae_pickle"):
        sae_weights = write_sae(root / name) / "sae_weights.safetensors"
        if name == "sae_truncated":
            sae_weights.write_bytes(sae_weights.read_bytes()[:300])
        else:
            torch.save({"W_enc": torch.zeros(64, 32)}, sae_weights)
    np.save(root / "bad_direction.npy", np.ones(7))
    np.savez(root / "archive.npz", d=np.ones(64))
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "blank.txt").write_text("  \n")
    (root / "table.csv").write_text("text\nhello\n")
    (root / "no_corpus").mkdir()
    (root / "no_corpus" / "notes.md").write_text("not a corpus kind")
    (root / "docs.jsonl").write_text('{"text": "hello world, a document", "n": 3}\n' * 50)
    return {p.name: str(p) for p in root.iterdir()}


CASES = [
    # wrong types and out-of-range values
    (["--model.n_tokens", "abc"], "model.n_tokens"),
    (["--model.n_tokens", "1.5"], "model.n_tokens"),
    (["--model.n_tokens", "-3"], "n_tokens -3 is out of range"),
    (["--model.n_tokens", "0"], "n_tokens 0 is out of range"),
    (["--model.chunk_rows", "-1"], "chunk_rows -1 is out of range"),
    (["--threads", "0"], "threads 0 is out of range"),
    (["--model.compile_mode", "fast"], "compile_mode 'fast' is unknown"),
    (["--model.chunk_rows", "lots"], "model.chunk_rows"),
    (["--model.matmul_precision", "tf32"], "matmul_precision 'tf32' is unknown"),
    (["--trainer.precision", "bf16-true"], "trainer.precision 'bf16-true' is not supported"),
    (["--trainer.precision", "16-true"], "trainer.precision '16-true' is not supported"),
    (["--model.n_tokens", "33"], "n_tokens 33 is out of range"),
    (["--model.n_tokens", "99999999999999999999999"], "n_tokens 99999999999999999999999 is out of range"),
    (["--model.lr", "abc"], "model.lr"),
    (["--model.lr", "[1]"], "model.lr"),
    (["--model.lr", "0"], "lr 0.0 is out of range"),
    (["--model.lr=-1e-3"], "lr -0.001 is out of range"),
    (["--model.lr", "1e400"], "lr inf is not a finite number"),
    (["--model.lr", "1e7"], "allowed: (0, 1e+06]"),
    (["--model.l2", "-1"], "l2 -1.0 is out of range"),
    (["--model.l2", "nan"], "model.l2"),
    (["--trainer.max_steps", "0"], "max_steps 0 is out of range"),
    (["--trainer.max_steps", "-5"], "max_steps -5 is out of range"),
    (["--trainer.max_steps", "abc"], "trainer.max_steps"),
    (["--trainer.max_steps", "1.5"], "trainer.max_steps"),
    (["--trainer.devices", "0"], "devices"),
    (["--trainer.accelerator", "gpu"], "gpu"),
    (["--trainer.precision", "bogus"], "precision"),
    # targets
    (["--model.target", ""], "target '' is malformed"),
    (["--model.target", "blocks.1.hook_resid_pre:٩"], "is malformed"),
    (["--model.target", "BLOCKS.1.hook_resid_pre:1"], "is malformed"),
    (["--model.target", "blocks.99999999999999999999.hook_resid_pre:0"], "layer 99999999999999999999 is out of range"),
    (["--model.target", "blocks.1.hook_resid_pre:-1"], "unit -1 is out of range"),
    (["--model.target", "blocks.1.hook_résid_pre:1"], "malformed"),
    (["--model.target", "blocks.1.attn.hook_z:1"], "hook 'attn.hook_z' is unknown"),
    # seeds
    (["--seeds", ""], "empty"),
    (["--seeds", "[]"], "empty"),
    (["--seeds", "0-99999999999"], "at most 100000"),
    (["--seeds", "[0,-1]"], "seed -1 is out of range"),
    (["--seeds", "1e3"], "not a non-negative integer"),
    (["--seeds", "٣-١"], "not a non-negative integer"),
    (["--seeds", "0,1,1"], "repeat [1]"),
    (["--seed", "-1"], "seed -1 is out of range"),
    (["--seed", "abc"], "seed"),
    (["--seed", "99999999999999999999999"], "out of range"),
    (["--seed", "1", "--seeds", "2"], "both given"),
    # model sources
    (["--model.model_name_or_path", ""], "is empty"),
    (["--model.model_name_or_path", "./ñø-模型"], "does not exist"),
    (["--model.model_name_or_path", "gpt2"], "cannot load model 'gpt2'"),
    (["--model.model_name_or_path", "{no_weights}"], "cannot load model from folder"),
    (["--model.model_name_or_path", "{damaged_weights}"], "cannot load model from folder"),
    (["--model.model_name_or_path", "{no_tokenizer}"], "tokenizer files are missing or damaged"),
    (["--model.model_name_or_path", "{corrupted.ckpt}"], "is a file"),
    # config files
    (["--config", "{malformed.yaml}"], "Problems parsing config"),
    (["--config", "{list.yaml}"], "Unexpected config"),
    (["--config", "{wrong_types.yaml}"], "model.n_tokens"),
    (["--config", "{unknown_key.yaml}"], "no_such_option"),
    (["--config", "{bad_seeds.yaml}"], "seed range '9-0' is empty"),
    (["--config", "no-such-config.yaml"], "no-such-config.yaml"),
    # checkpoints
    (["--ckpt_path", "no-such.ckpt"], "is not a file"),
    (["--ckpt_path", "{corrupted.ckpt}"], "cannot be read safely"),
    (["--ckpt_path", "{unsafe.ckpt}"], "cannot be read safely"),
    (["--ckpt_path", "{foreign.ckpt}"], "not an amax_lightning checkpoint"),
    (["--ckpt_path", "{other_seeds.ckpt}"], "checkpoint was made with seeds=[5]"),
    (["--ckpt_path", "last"], "no version_*/checkpoints/last.ckpt"),
    (["--model.target", "blocks.1.hook_resid_pre:9-2"], "empty range"),
    (["--model.target", "blocks.1.hook_resid_pre:*", "--results.baseline_top_k", "3"], "not a sweep"),
    # analysis options
    (["--results.null_samples", "-1"], "results.null_samples -1 is out of range"),
    # sizes that set the run's cost are bounded
    (["--results.null_samples", "100000000000"], "results.null_samples 100000000000 is out of range; it must be in 0..1000000"),
    (["--results.null_simulations", "10000000000"], "results.null_simulations 10000000000 is out of range"),
    (["--results.baseline_top_k", "100000000"], "results.baseline_top_k 100000000 is out of range"),
    (["--results.baseline_top_k", "60000"], "vocabulary allows 0..50257"),
    (["--trainer.max_steps", "100000000000"], "trainer.max_steps 100000000000 is out of range"),
    (["--model.target", "blocks.1.mlp.hook_post:*", "--seeds", "0-9999"], "are too many; at most 1000000"),
    (["--model.priors", "softmax=1", "--seeds", "0-9999"], "numbers; at most 2147483648 are allowed"),
    (["--results.baseline_top_k", "x"], "results.baseline_top_k"),
    (["--results.baseline_text", "notes.txt"], "use --results.corpus notes.txt"),
    (["--model.aggregate", "median"], "aggregate 'median' is unknown"),
    (["--model.priors", "clamp,nope"], "prior 'nope' is unknown"),
    (["--model.priors", "softmax=0"], "out of range"),
    (["--model.priors", "vocab_distance=1e300"], "vocab_distance=1e300 is out of range; allowed: [0, 1e+06]"),
    (["--trainer.log_every_n_steps", "0"], "trainer.log_every_n_steps 0 is out of range"),
    (["--checkpoint.every_n_train_steps", "-5"], "checkpoint.every_n_train_steps -5 is out of range"),
    # SAE and direction targets
    (["--model.target", "sae:{sae_gated}:0"], "architecture 'gated'; supported: standard"),
    (["--model.target", "sae:{sae_wide}:0"], "has d_in 60 but blocks.1.hook_resid_pre is 64 wide"),
    (["--model.target", "sae:{sae_nan}:0"], "NaN or infinite values in b_enc"),
    (["--model.target", "sae:{sae_nan_decoder}:top2@5"], "NaN or infinite values in W_dec"),
    (["--model.target", "sae:{sae_no_weights}:0"], "has no sae_weights.safetensors"),
    (["--model.target", "sae:{sae_truncated}:0"], "cannot be read as safetensors"),
    (["--model.target", "sae:{sae_pickle}:0"], "cannot be read as safetensors"),
    (["--model.target", "sae:{sae_hook9}:0"], "reads layer 9"),
    (["--model.target", "sae:{sae_ok}:99"], "SAE latent 99 is out of range"),
    (["--model.target", "sae:{sae_ok}:*", "--results.baseline_top_k", "3"], "not a sweep"),
    (["--model.target", "sae:no-such-folder:0"], "is not a folder"),
    (["--model.target", "blocks.1.hook_resid_pre@{bad_direction.npy}"], "has shape (7,)"),
    (["--model.target", "blocks.1.hook_resid_pre@no-such.npy"], "is not a file"),
    (["--model.target", "blocks.1.hook_resid_pre@{archive.npz}"], "is an .npz archive"),
    # the corpus pass (analysis/corpus_source.py): refused before the steps
    (["--results.corpus", "{binary.txt}"], "cannot be read"),
    (["--results.corpus", "{blank.txt}", "--results.corpus_window", "16"], "fewer than 15 tokens of text"),
    (["--results.corpus", "{table.csv}"], "is not a text, jsonl or parquet file"),
    (["--results.corpus", "{no_corpus}"], "is a folder without .txt, .jsonl or .parquet files"),
    (["--results.corpus", "{docs.jsonl}", "--results.corpus_column", "body"], "'body' is not in the corpus"),
    (["--results.corpus", "{docs.jsonl}", "--results.corpus_column", "n"], "holds int values, not text"),
    (["--results.corpus", "{docs.jsonl}", "--results.corpus_tokens", "10", "--results.corpus_window", "16"],
     "results.corpus_tokens 10 is below one window"),
    (["--results.corpus", "{docs.jsonl}", "--results.corpus_window", "64"], "this model's context allows 2..32"),
    (["--results.corpus", "{docs.jsonl}", "--results.corpus_window", "1"], "results.corpus_window 1 is out of range"),
    (["--results.corpus", "nobody/no-such-corpus"], "neither cached nor reachable"),
    (["--results.corpus", "../no such/корпус"], "neither a file, a folder nor a hub dataset id"),
    (["--model.sae_activation", "mid"], "sae_activation 'mid' is unknown"),
    (["--model.center_residual", "maybe"], "center_residual 'maybe' is unknown"),
    # the command line itself
    (["--no-such-flag", "1"], "unrecognized arguments"),
]


@pytest.mark.parametrize("extra, message", CASES, ids=[f"{i}:{' '.join(a)[:40]}" for i, (a, _) in enumerate(CASES)])
def test_hostile_input(tiny_gpt2_dir, bad, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    extra = [re.sub(r"\{([^{}]+)\}", lambda m: bad[m.group(1)], arg) for arg in extra]
    args = ["fit", "--model.model_name_or_path", str(tiny_gpt2_dir), "--model.target", TINY_TARGET,
            "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("amax_lightning: error: ") and message in last, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_case_count():
    assert len(CASES) >= 55
