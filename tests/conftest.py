"""Shared fixtures: tiny models saved to temp folders (random init, real GPT-2 tokenizer), and a CLI runner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: the suite never touches the network

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, LlamaConfig, LlamaModel

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "gpt2_tokenizer"
REPO = Path(__file__).resolve().parents[1]
TINY_TARGET = "blocks.2.hook_resid_pre:5"


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
