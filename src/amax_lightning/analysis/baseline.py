"""Data-sampling baseline: which real tokens (and text contexts) drive the target unit highest?

Each function reads ``target`` from the backbone, or, given ``reader(inputs_embeds) -> (batch, n_tokens)``
(``RowObjective.unit_reader``), whatever that reads: an SAE latent or a direction.

Gradient ascent finds *vectors*; this module asks the data directly. :func:`top_tokens` runs every vocabulary
token alone as a one-token input; :func:`top_contexts` runs a text file in sliding windows and reports the
positions of highest activation with the max token wrapped in ``[[ ]]``. :func:`overlap` counts how many
gradient-ascent tokens are among the top data tokens.

Note: a one-token input sits at position 0, where GPT-2's residual stream has massive activations in a few
dimensions; the per-token ranking is a ranking *at position 0*, which the text-file path does not share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from amax_lightning.base.checks import check_int
from amax_lightning.base.errors import UserError
from amax_lightning.base.progress import Progress
from amax_lightning.model.backbone import Backbone
from amax_lightning.model.targets import Target, parse_target


@dataclass(frozen=True)
class TopTokens:
    """The k vocabulary tokens of highest one-token activation, best first (ties: lower id first)."""

    token_ids: list[int]
    tokens: list[str]
    activations: list[float]


@dataclass(frozen=True)
class TopContext:
    """One text position of high activation.

    Attributes
    ----------
    position
        Index of the token in the tokenized file (0-based).
    token_id, token
        The token at that position.
    activation
        The unit's activation there (the target's units).
    text
        The surrounding text with the token wrapped in ``[[ ]]``.
    context, context_activations, context_index
        The same window token by token, the activation at each token, and the max token's index in it.
    """

    position: int
    token_id: int
    token: str
    activation: float
    text: str
    context: list[str]  # the tokens of ``text``, one string each, the max token among them
    context_activations: list[float]  # the unit's activation at each of them
    context_index: int  # where the max token is in ``context``


@dataclass(frozen=True)
class Overlap:
    """How many gradient-ascent tokens (counted with repeats) are among the top-k data tokens.

    ``count`` of the ``n_gradient`` gradient tokens are in the top set; ``fraction = count / n_gradient``;
    ``shared_ids`` are the distinct shared ids, ascending.
    """

    count: int
    n_gradient: int
    fraction: float
    shared_ids: list[int]



def _target(backbone: Backbone, target: Target | str) -> Target:
    target = target if isinstance(target, Target) else parse_target(target, backbone.shape)
    if not backbone.supports(target):
        raise UserError(f"target {target.spec!r} cannot be read from this model; it supports hook_resid_pre only")
    return target


def _top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, largest first, ties broken by lower index (a stable sort)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


@torch.no_grad()
def token_activations(backbone: Backbone, target: Target | str, chunk_size: int = 4096, reader=None) -> torch.Tensor:
    """The target's activation for every vocabulary token fed alone as a one-token input.

    Parameters
    ----------
    backbone
        The frozen model and tokenizer.
    target
        The unit, as a :class:`Target` or a spec such as ``blocks.8.hook_resid_pre:91``.
    chunk_size
        Tokens run per forward pass (count, >= 1); bounds memory, does not change the result.

    Returns
    -------
    torch.Tensor
        Shape (V,) on the CPU, float32: entry i is the activation for token id i (V = ``len(vocab_embeddings)``).
    """
    target = _target(backbone, target)
    read = reader or (lambda inputs: backbone(inputs, target))
    chunk_size = check_int("chunk_size", chunk_size, 1)
    vocab_size = backbone.vocab_embeddings.shape[0]
    device = backbone.vocab_embeddings.device
    out = []
    with Progress("data baseline: one-token inputs", vocab_size, "tokens") as progress:
        for ids in torch.arange(vocab_size, device=device).split(chunk_size):
            out.append(read(backbone.embed_tokens(ids[:, None]))[:, 0].float().cpu())
            progress.advance(len(ids))
    return torch.cat(out)


def top_tokens(backbone: Backbone, target: Target | str, k: int = 20, chunk_size: int = 4096, reader=None) -> TopTokens:
    """The k vocabulary tokens whose one-token activation of ``target`` is highest.

    Parameters
    ----------
    backbone
        The frozen model and tokenizer.
    target
        The unit, as a :class:`Target` or a spec string.
    k
        Tokens to return (count, 1..V).
    chunk_size
        Tokens run per forward pass (count, >= 1).

    Returns
    -------
    TopTokens
    """
    k = check_int("k", k, 1, backbone.vocab_embeddings.shape[0])
    acts = token_activations(backbone, target, chunk_size, reader)
    ids = _top_indices(acts, k).tolist()
    return TopTokens(ids, backbone.token_strings(ids), acts[ids].tolist())


def _window_starts(n_tokens: int, window: int, stride: int) -> list[int]:
    """Window starts 0, stride, 2*stride, ... plus a last window ending at the text's end."""
    starts = list(range(0, max(n_tokens - window, 0) + 1, stride))
    if starts[-1] + window < n_tokens:
        starts.append(n_tokens - window)
    return starts


@torch.no_grad()
def text_activations(
    backbone: Backbone,
    target: Target | str,
    token_ids: torch.Tensor,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    reader=None,
) -> torch.Tensor:
    """The target's activation at every position of a token sequence, read in sliding windows.

    Windows of ``window`` tokens start every ``stride`` tokens (the last one ends at the sequence's end). Each
    position takes its value from the first window that holds it, i.e. the one giving it the most left context;
    with ``stride < window`` every position after the first window has at least ``window - stride`` tokens
    of context.

    Parameters
    ----------
    backbone
        The frozen model and tokenizer.
    target
        The unit, as a :class:`Target` or a spec string.
    token_ids
        The sequence, shape (N,), integer ids, N >= 1.
    window
        Tokens per forward pass (count, 1..context); default: the model's context (``max_positions``, or 1024).
    stride
        Tokens between window starts (count, 1..window); default ``window // 2`` (at least 1).
    batch_size
        Windows per forward pass (count, >= 1).

    Returns
    -------
    torch.Tensor
        Shape (N,) on the CPU, float32.
    """
    target = _target(backbone, target)
    read = reader or (lambda inputs: backbone(inputs, target))
    token_ids = torch.as_tensor(token_ids).reshape(-1).long()
    if token_ids.numel() == 0:
        raise UserError("the text has no tokens; give a non-empty text")
    context = backbone.max_positions or 1024
    window = check_int("window", context if window is None else window, 1, context)
    stride = check_int("stride", max(window // 2, 1) if stride is None else stride, 1, window)
    batch_size = check_int("batch_size", batch_size, 1)
    n = token_ids.numel()
    width = min(window, n)
    starts = _window_starts(n, width, stride)
    device = backbone.vocab_embeddings.device
    out = torch.empty(n)
    covered = 0
    with Progress("data baseline: text windows", len(starts), "windows") as progress:
        for first in range(0, len(starts), batch_size):
            batch_starts = starts[first : first + batch_size]
            ids = torch.stack([token_ids[s : s + width] for s in batch_starts]).to(device)
            acts = read(backbone.embed_tokens(ids)).float().cpu()
            for row, s in zip(acts, batch_starts):
                out[covered : s + width] = row[covered - s :]
                covered = s + width
            progress.advance(len(batch_starts))
    return out


def _highlight(backbone: Backbone, ids: list[int], position: int, context_tokens: int) -> str:
    tok = backbone.tokenizer
    before = tok.decode(ids[max(0, position - context_tokens) : position])
    after = tok.decode(ids[position + 1 : position + 1 + context_tokens])
    return f"{before}[[{tok.decode([ids[position]])}]]{after}"


def top_contexts(
    backbone: Backbone,
    target: Target | str,
    path: str | Path,
    k: int = 10,
    window: int | None = None,
    stride: int | None = None,
    context_tokens: int = 10,
    batch_size: int = 8,
    reader=None,
) -> list[TopContext]:
    """The k positions of a UTF-8 text file where ``target`` is highest, each shown in its context.

    Parameters
    ----------
    backbone
        The frozen model and tokenizer (the text is tokenized with it, no special tokens added).
    target
        The unit, as a :class:`Target` or a spec string.
    path
        The text file.
    k
        Positions to return (count, >= 1; fewer if the text is shorter), highest first, ties by position.
    window, stride, batch_size
        As in :func:`text_activations`.
    context_tokens
        Tokens shown on each side of the max token (count, >= 0).

    Returns
    -------
    list[TopContext]
    """
    k = check_int("k", k, 1)
    context_tokens = check_int("context_tokens", context_tokens, 0)
    text = read_text_file(path)
    ids = backbone.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids:
        raise UserError(f"text file {str(path)!r} has no tokens; give a non-empty text")
    acts = text_activations(backbone, target, torch.tensor(ids), window, stride, batch_size, reader)
    contexts = []
    for p in _top_indices(acts, k).tolist():
        start, stop = max(0, p - context_tokens), p + 1 + context_tokens
        contexts.append(TopContext(p, ids[p], backbone.tokenizer.decode([ids[p]]), float(acts[p]),
                                   _highlight(backbone, ids, p, context_tokens), backbone.token_strings(ids[start:stop]),
                                   acts[start:stop].tolist(), p - start))
    return contexts


def read_text_file(path: str | Path) -> str:
    """The text of a UTF-8 file with some non-blank text; a one-line UserError otherwise."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"text file {str(path)!r} does not exist or is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"text file {str(path)!r} is not UTF-8: {exc.reason}") from exc
    except OSError as exc:
        raise UserError(f"text file {str(path)!r} cannot be read: {exc.strerror}") from exc
    if not text.strip():
        raise UserError(f"text file {str(path)!r} has no tokens; give a non-empty text")
    return text


def overlap(gradient_token_ids, top_ids) -> Overlap:
    """How many gradient-ascent tokens are among the top data tokens.

    Parameters
    ----------
    gradient_token_ids
        Decoded ids of the optimized vectors, any shape (e.g. seeds x tokens); repeats count each time.
    top_ids
        Ids of the top-k data tokens (e.g. ``TopTokens.token_ids``); repeats are ignored.

    Returns
    -------
    Overlap
        ``count`` gradient tokens in ``top_ids``, ``n_gradient``, ``fraction = count / n_gradient``, and the
        distinct shared ids.
    """
    grad = [int(i) for i in torch.as_tensor(gradient_token_ids).reshape(-1).tolist()]
    top = {int(i) for i in torch.as_tensor(top_ids).reshape(-1).tolist()}
    if not grad:
        raise UserError("gradient_token_ids is empty; give at least one token id")
    count = sum(i in top for i in grad)
    return Overlap(count, len(grad), count / len(grad), sorted(top.intersection(grad)))
