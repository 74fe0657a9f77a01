"""Where real text comes from: a corpus read with Hugging Face ``datasets``, cut into fixed token windows.

A corpus is a hub dataset id (streamed; through the HF cache, honouring ``HF_HUB_OFFLINE``: offline, a dataset
loaded once before is read from the cache) or local files: ``.txt`` (one document per paragraph), ``.jsonl`` /
``.json`` or ``.parquet``, or a folder of them. Documents are tokenized without special tokens and joined into one
stream, each followed by the end-of-text token (GPT-2's ``<|endoftext|>``) where the tokenizer has one; windows
of ``window`` tokens are cut from that stream, each starting with the model's BOS token where it has one
(Neuronpedia's and SAELens's convention). The budget counts every token fed to the model, BOS included.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from amax_lightning.base.checks import check_int
from amax_lightning.base.errors import UserError, first_line

DEFAULT_SPLIT = "train"
DEFAULT_COLUMN = "text"
DEFAULT_TOKENS = 1_048_576  # about 1M tokens (Neuronpedia's dashboards use about 3M: 24,576 prompts x 128)
DEFAULT_WINDOW = 128
MAX_TOKENS = 1_000_000_000  # the windows' token ids are kept (4 bytes each) for the examples' second pass
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix -> datasets builder
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
TEXTS_PER_BATCH = 256  # documents tokenized together


@dataclass(frozen=True)
class CorpusSpec:
    """What to read: ``source`` (hub id or path), its ``split`` and text ``column`` (not used for ``.txt``), the
    budget ``tokens`` (tokens fed to the model, BOS included) and the ``window`` length (tokens per forward)."""

    source: str
    split: str = DEFAULT_SPLIT
    column: str = DEFAULT_COLUMN
    tokens: int = DEFAULT_TOKENS
    window: int = DEFAULT_WINDOW

    @property
    def n_windows(self) -> int:
        """The most windows the budget allows."""
        return self.tokens // self.window


def corpus_spec(source: str, split: str = DEFAULT_SPLIT, column: str = DEFAULT_COLUMN, tokens: int = DEFAULT_TOKENS,
                window: int = DEFAULT_WINDOW) -> CorpusSpec:
    """A checked ``CorpusSpec``: a one-line UserError (flags ``results.corpus*``) for a bad value.

    Opens the source and reads its first document, so that a missing file or column, a file that is not text, jsonl
    or parquet, or a dataset that is neither cached nor reachable fails now, before any step."""
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"results.corpus {source!r} is empty; give a hub dataset id or a .txt/.jsonl/.parquet path")
    for name, value in (("results.corpus_split", split), ("results.corpus_column", column)):
        if not isinstance(value, str) or not value:
            raise UserError(f"{name} {value!r} must be a non-empty string")
    window = check_int("results.corpus_window", window, 2)
    tokens = check_int("results.corpus_tokens", tokens, 1, MAX_TOKENS)
    if tokens < window:
        raise UserError(f"results.corpus_tokens {tokens} is below one window; it must be >= results.corpus_window "
                        f"({window})")
    spec = CorpusSpec(source.strip(), split, column, tokens, window)
    next(iter_documents(spec), None)  # opens it; an empty corpus is found by the pass (it may be long to read)
    return spec


def check_window(spec: CorpusSpec, max_positions: int | None) -> None:
    """A UserError when the window is longer than the model's context."""
    if max_positions is not None and spec.window > max_positions:
        raise UserError(f"results.corpus_window {spec.window} is out of range; this model's context allows "
                        f"2..{max_positions}")


def _local_files(path: Path) -> dict[str, list[str]]:
    """The files under ``path`` by datasets builder; a UserError for files of another kind."""
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"results.corpus {str(path)!r} is not a text, jsonl or parquet file; allowed suffixes: "
                            f"{', '.join(BUILDERS)}")
        return {builder: [str(path)]}
    files: dict[str, list[str]] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        builder = BUILDERS.get(file.suffix.lower())
        if builder is not None:
            files.setdefault(builder, []).append(str(file))
    if not files:
        raise UserError(f"results.corpus {str(path)!r} is a folder without .txt, .jsonl or .parquet files")
    return files


def _open(spec: CorpusSpec):
    """``(datasets, column)`` pairs: iterable datasets of documents and the column holding their text."""
    import datasets  # imported only when a corpus is read (about a second)

    datasets.disable_progress_bars()
    path = Path(spec.source).expanduser()
    try:
        if path.exists():
            opened = []
            for builder, files in _local_files(path).items():
                options = {"sample_by": "paragraph"} if builder == "text" else {}
                dataset = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **options)
                opened.append((dataset, "text" if builder == "text" else spec.column))
            return opened
        if not _HUB_ID.match(spec.source) or spec.source.startswith((".", "/", "~")):
            raise UserError(f"results.corpus {spec.source!r} is neither a file, a folder nor a hub dataset id "
                            "(owner/name)")
        return [(datasets.load_dataset(spec.source, split=spec.split, streaming=True), spec.column)]
    except UserError:
        raise
    except Exception as exc:  # datasets raises many kinds: connection, not found, bad split, bad file
        raise UserError(f"results.corpus {spec.source!r} (split {spec.split!r}) cannot be read: neither cached nor "
                        f"reachable, or not a dataset: {first_line(exc)}") from exc


def iter_documents(spec: CorpusSpec) -> Iterator[str]:
    """The corpus's documents in order; a UserError for a missing column, non-text values or unreadable files."""
    for dataset, column in _open(spec):
        rows = iter(dataset)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except Exception as exc:  # a damaged file, bad UTF-8, a schema mismatch between files
                raise UserError(f"results.corpus {spec.source!r} cannot be read: {first_line(exc)}") from exc
            if column not in row:
                raise UserError(f"results.corpus_column {column!r} is not in the corpus {spec.source!r}; its columns: "
                                f"{', '.join(map(str, row)) or 'none'}")
            text = row[column]
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"results.corpus_column {column!r} of {spec.source!r} holds {type(text).__name__} "
                                "values, not text")
            yield text


def bos_and_separator(tokenizer) -> tuple[int | None, int | None]:
    """The token starting each window (BOS, else None) and the one after each document (EOS, else None)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (None if bos is None else int(bos)), (None if eos is None else int(eos))


def iter_windows(spec: CorpusSpec, tokenizer, batch_windows: int) -> Iterator[torch.Tensor]:
    """Batches of at most ``batch_windows`` windows, int64 (n, window), in corpus order, until the budget or the
    corpus ends (the last partial window is dropped). A UserError when the corpus has not one whole window."""
    bos, separator = bos_and_separator(tokenizer)
    body = spec.window - (bos is not None)  # corpus tokens per window
    n_windows, made = spec.n_windows, 0
    stream: list[int] = []
    batch: list[list[int]] = []

    def documents_in_batches() -> Iterator[list[str]]:
        texts = []
        for text in iter_documents(spec):
            if text:
                texts.append(text)
            if len(texts) == TEXTS_PER_BATCH:
                yield texts
                texts = []
        if texts:
            yield texts

    for texts in documents_in_batches():
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            if not ids:
                continue
            stream.extend(ids)
            if separator is not None:
                stream.append(separator)
        taken = 0
        while len(stream) - taken >= body and made < n_windows:
            batch.append(([bos] if bos is not None else []) + stream[taken : taken + body])
            taken += body
            made += 1
            if len(batch) == batch_windows:
                yield torch.tensor(batch, dtype=torch.long)
                batch = []
        del stream[:taken]
        if made == n_windows:
            break
    if batch:
        yield torch.tensor(batch, dtype=torch.long)
    if made == 0:
        raise UserError(f"results.corpus {spec.source!r} has fewer than {body} tokens of text: not one window of "
                        f"{spec.window}; give a larger corpus or a shorter results.corpus_window")


def describe(spec: CorpusSpec) -> str:
    """``source`` as the results name it: the path as given, or ``id (split)`` for a hub dataset."""
    return spec.source if os.path.exists(os.path.expanduser(spec.source)) else f"{spec.source} ({spec.split})"
