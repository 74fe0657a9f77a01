"""Reading a corpus with ``datasets``: local .txt / .jsonl / .parquet files and folders cut into windows by hand,
the hub path offline from a dataset in the HF cache, and one-line errors for what cannot be read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, TOKENIZER_DIR
from transformers import GPT2Tokenizer

from amax_lightning.analysis.corpus_source import CorpusSpec, corpus_spec, iter_documents, iter_windows
from amax_lightning.base.errors import UserError

DOCS = ["The first document.", "Second one: <script>alert(1)</script> \u0000 \u202e rtl", "", "third " * 30]


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2Tokenizer.from_pretrained(TOKENIZER_DIR)


def by_hand(tokenizer, documents: list[str], window: int, budget: int) -> list[list[int]]:
    stream = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += ids + [tokenizer.eos_token_id] if ids else []
    body = window - 1
    return [[tokenizer.bos_token_id] + stream[i * body : (i + 1) * body]
            for i in range(min(len(stream) // body, budget // window))]


def windows_of(spec: CorpusSpec, tokenizer, batch: int = 3) -> list[list[int]]:
    return torch.cat(list(iter_windows(spec, tokenizer, batch))).tolist()


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt", "folder"])
def test_local_files_are_cut_into_windows_as_by_hand(tmp_path, tokenizer, kind):
    if kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)), encoding="utf-8")
    elif kind == "parquet":
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"text": DOCS}), path)
    elif kind == "txt":  # one document per paragraph
        path = tmp_path / "docs.txt"
        path.write_text("\n\n".join(d for d in DOCS if d), encoding="utf-8")
    else:  # a folder of both kinds, read kind by kind, files in name order
        path = tmp_path / "corpus"
        (path / "b").mkdir(parents=True)
        pq.write_table(pa.table({"text": DOCS[:2]}), path / "b" / "part.parquet")
        (path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[2:]), encoding="utf-8")
        (path / "README.md").write_text("not read")
    spec = corpus_spec(str(path), tokens=200, window=8)
    documents = list(iter_documents(spec))
    expected = DOCS[2:] + DOCS[:2] if kind == "folder" else [d for d in DOCS if d or kind != "txt"]
    assert [d.strip() for d in documents] == [d.strip() for d in expected]
    assert windows_of(spec, tokenizer) == by_hand(tokenizer, documents, 8, 200)


def test_the_budget_and_the_window_bound_the_windows(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "word " * 500}) + "\n", encoding="utf-8")
    got = windows_of(corpus_spec(str(path), tokens=100, window=16), tokenizer, batch=4)
    assert len(got) == 6 and all(len(w) == 16 and w[0] == tokenizer.bos_token_id for w in got)
    assert got == by_hand(tokenizer, ["word " * 500], 16, 100)


def test_a_hub_dataset_is_read_offline_from_the_hf_cache(tmp_path):
    """The real call (``load_dataset(id, split, streaming=True)``) with HF_HUB_OFFLINE=1 reads a dataset that an
    earlier online load left in the datasets cache; the cache is built here the way that load builds it."""
    script = textwrap.dedent(f"""
        import glob, os, shutil
        import datasets, pyarrow as pa, pyarrow.parquet as pq
        from amax_lightning.analysis.corpus_source import corpus_spec, iter_documents
        from amax_lightning.base.errors import UserError
        pq.write_table(pa.table({{"content": {DOCS!r}}}), "train.parquet")
        datasets.load_dataset("parquet", data_files={{"train": "train.parquet"}})
        cache = datasets.config.HF_DATASETS_CACHE
        built = [p for p in glob.glob(os.path.join(cache, "parquet", "*", "*", "*")) if os.path.isdir(p)][0]
        target = os.path.join(cache, "someone___tiny-pile", "default", "0.0.0", os.path.basename(built))
        shutil.copytree(built, target)
        for name in os.listdir(target):
            if name.startswith("parquet-"):
                os.rename(os.path.join(target, name), os.path.join(target, name.replace("parquet-", "tiny-pile-")))
        spec = corpus_spec("someone/tiny-pile", split="train", column="content", tokens=64, window=8)
        print(repr(list(iter_documents(spec))))
        try:
            corpus_spec("someone/not-cached", tokens=64, window=8)
        except UserError as error:
            print(error)
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == repr(DOCS)
    assert lines[1].startswith("results.corpus 'someone/not-cached' (split 'train') cannot be read: neither cached")


@pytest.mark.parametrize("make, message", [
    (lambda p: corpus_spec(str(p / "none.jsonl")), "neither a file, a folder nor a hub dataset id"),
    (lambda p: corpus_spec(str(p / "x.csv")), "is not a text, jsonl or parquet file"),
    (lambda p: corpus_spec(str(p / "docs.jsonl"), column="body"), "'body' is not in the corpus"),
    (lambda p: corpus_spec(str(p / "docs.jsonl"), tokens=10, window=16), "below one window"),
    (lambda p: corpus_spec(str(p / "docs.jsonl"), window=1), "corpus_window 1 is out of range"),
    (lambda p: corpus_spec(str(p / "docs.jsonl"), tokens=0), "corpus_tokens 0 is out of range"),
    (lambda p: corpus_spec("  "), "is empty"),
    (lambda p: corpus_spec(str(p / "docs.jsonl"), split=""), "corpus_split '' must be a non-empty string"),
    (lambda p: corpus_spec(str(p / "bad.parquet")), "cannot be read"),
])
def test_bad_corpora_are_one_line_user_errors(tmp_path, make, message):
    (tmp_path / "x.csv").write_text("text\nhi\n")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=message) as info:
        make(tmp_path)
    assert "\n" not in str(info.value)


def test_a_corpus_without_one_window_of_text_is_refused(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "just a few words"}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(UserError, match="fewer than 31 tokens of text: not one window of 32"):
        windows_of(corpus_spec(str(path), window=32), tokenizer)
