"""Logit effects, as Neuronpedia shows them: the tokens a unit's output direction promotes and suppresses.

A unit that writes a direction ``w`` (d_model) into the residual stream pushes the next-token logits by
``W_U @ w``: its top entries are the tokens it promotes, its bottom entries those it suppresses. ``w`` is

- a residual coordinate D (``hook_resid_pre/mid/post:D``): the unit vector e_D, so ``W_U @ w`` is column D of W_U;
- an MLP neuron N (``mlp.hook_post:N``): row N of the block's output weight ``W_out`` (HF ``mlp.c_proj.weight``);
- an SAE latent: its decoder row ``W_dec[latent]`` (mapped through ``W_out`` for an SAE on ``mlp.hook_post``);
- a direction file: the (unit-norm) direction.

``ln_f``'s scale is not applied (neither its gain nor the division by the residual's norm), as on Neuronpedia:
the numbers are the direct path's logits per unit of the direction, comparable between units of one model.
Attention q/k/v write nothing into the residual stream by themselves: none for them. ``W_U`` is the tied input
embedding (GPT-2); a model without tied embeddings gets none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amax_lightning.model.backbone import Backbone
from amax_lightning.model.targets import HEAD_HOOKS, Target

TOP = 10  # tokens listed on each side
LN_F_SCALE = False  # whether ln_f's gain is applied to the direction (it is not: Neuronpedia's convention)


@dataclass(frozen=True)
class LogitToken:
    """One token and how much the unit's direction moves its logit (logit units per unit of the direction)."""

    token_id: int
    token: str
    logit: float


@dataclass(frozen=True)
class LogitEffects:
    """The ``TOP`` tokens a unit promotes (largest ``W_U @ w`` first) and suppresses (smallest first)."""

    direction: str  # what w is, e.g. "e_91 (residual coordinate)"
    ln_f_scale: bool
    promoted: list[LogitToken]
    suppressed: list[LogitToken]


def unembedding(backbone: Backbone) -> torch.Tensor | None:
    """The unembedding W_U (V, d_model) when the model ties it to the input embedding (GPT-2), else None."""
    if not getattr(backbone.model.config, "tie_word_embeddings", False):
        return None
    return backbone.vocab_embeddings.detach()


def residual_directions(backbone: Backbone, target: Target, hook_vectors: torch.Tensor | None
                        ) -> tuple[torch.Tensor, str] | None:
    """The residual-stream directions (units, d_model) that hook-space vectors (units, width) write, and what
    they are; None for attention q/k/v and for units without a written vector."""
    if hook_vectors is None or target.hook in HEAD_HOOKS:
        return None
    vectors = hook_vectors.detach().float().cpu()
    if target.hook == "mlp.hook_post":
        if not backbone.is_gpt2:
            return None
        w_out = backbone.model.h[target.layer].mlp.c_proj.weight.detach().float().cpu()  # Conv1D: (d_mlp, d_model)
        return vectors @ w_out, f"W_out of block {target.layer}'s MLP applied to the unit's vector"
    return vectors, "the unit's vector in the residual stream"


def logit_effects(backbone: Backbone, targets: list[Target], hook_vectors: torch.Tensor | None, top: int = TOP,
                  chunk: int = 256) -> list[LogitEffects | None]:
    """Per unit, the ``top`` tokens of largest and of smallest ``W_U @ w`` (``w`` from ``residual_directions``);
    None per unit where there is no direction or no unembedding. Computed ``chunk`` units at a time."""
    w_u = unembedding(backbone)
    resolved = residual_directions(backbone, targets[0], hook_vectors) if targets else None
    if w_u is None or resolved is None:
        return [None] * len(targets)
    directions, what = resolved
    w_u = w_u.float().cpu()
    k = min(top, w_u.shape[0])
    out: list[LogitEffects | None] = []
    for start in range(0, len(targets), chunk):
        logits = directions[start:start + chunk] @ w_u.T  # (chunk, V)
        high, low = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
        for values, ids, lows, low_ids, target in zip(high.values.tolist(), high.indices.tolist(),
                                                      low.values.tolist(), low.indices.tolist(),
                                                      targets[start:start + chunk]):
            out.append(LogitEffects(
                direction=_describe(target, what),
                ln_f_scale=LN_F_SCALE,
                promoted=[LogitToken(i, t, v) for i, t, v in zip(ids, backbone.token_strings(ids), values)],
                suppressed=[LogitToken(i, t, v) for i, t, v in zip(low_ids, backbone.token_strings(low_ids), lows)],
            ))
    return out


def _describe(target: Target, what: str) -> str:
    if target.label is None and target.hook != "mlp.hook_post":
        return f"e_{target.unit[0]}: residual coordinate {target.unit[0]}"
    if target.label is None:
        return f"W_out[{target.unit[0]}]: the output row of MLP neuron {target.unit[0]} in block {target.layer}"
    if target.label.startswith("sae:"):
        return f"W_dec[{target.unit[0]}]: the SAE decoder row ({what})"
    return f"the direction read ({what})"
