"""Which tokens a token search may use: the ``exclude_tokens`` spec, and the mask of allowed vocabulary ids."""

from __future__ import annotations

import os

import torch

from amax_lightning.base.errors import UserError, first_line
from amax_lightning.model.backbone import Backbone


def parse_exclude_tokens(spec: str, vocab_size: int) -> list[int]:
    """Token ids from ``spec``: ``""``, ids ``"13,198"``, or a text file of ids separated by commas or whitespace."""
    spec = (spec or "").strip()
    if not spec:
        return []
    text, where = spec, "exclude_tokens"
    if not all(part.strip().isdigit() for part in spec.split(",")):
        if not os.path.isfile(spec):
            raise UserError(f"exclude_tokens {spec!r} is neither comma-separated token ids nor a file of ids")
        try:
            with open(spec, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"exclude_tokens file {spec!r} cannot be read: {first_line(exc)}") from exc
        where = f"exclude_tokens file {spec!r}"
    ids = []
    for part in text.replace(",", " ").split():
        if not (part.isascii() and part.isdigit() and len(part) <= 12) or int(part) >= vocab_size:
            raise UserError(f"{where}: {part!r} is not a token id; allowed: integers 0..{vocab_size - 1}")
        ids.append(int(part))
    return ids


def allowed_tokens(backbone: Backbone, exclude: list[int]) -> torch.Tensor:
    """Bool mask (V,) of the tokens a search may use: not special, known to the tokenizer, not in ``exclude``."""
    vocab_size = backbone.vocab_embeddings.shape[0]
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[: min(vocab_size, len(backbone.tokenizer))] = True
    allowed[[i for i in backbone.tokenizer.all_special_ids if i < vocab_size]] = False
    allowed[exclude] = False
    if not allowed.any():
        raise UserError("exclude_tokens leaves no token to search over")
    return allowed
