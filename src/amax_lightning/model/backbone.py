"""The frozen language model: loading (hub id or local folder), freezing, and the forward up to a target.

GPT-2 models run a truncated forward written against the HF module's own weights: embeddings + positions,
then only the first ``target.layer`` blocks (no later blocks, no ``ln_f``, no LM head). Every other HF model
that accepts ``inputs_embeds`` and returns ``hidden_states`` runs its full forward (slower, same numbers).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, GPT2Model, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import NewGELUActivation
from transformers.utils import logging as hf_logging

from amax_lightning.base.errors import UserError, first_line
from amax_lightning.model.targets import RESIDUAL_HOOKS, ModelShape, Target


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def resolve_model_source(name_or_path: str) -> str:
    """Return the local folder for ``name_or_path`` if it is one, else the hub id unchanged.

    Raises
    ------
    UserError
        If the name is empty, or looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``) but is not a folder.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UserError(f"model_name_or_path {name_or_path!r} is empty; give a hub id like gpt2 or a model folder")
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise UserError(f"model_name_or_path {name_or_path!r} is a file; give a model folder or a hub id like gpt2")
    if _looks_like_path(name_or_path):
        raise UserError(f"model folder {name_or_path!r} does not exist; give an existing folder or a hub id like gpt2")
    return name_or_path


def _load(loader, source: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(source, **kwargs)
    except Exception as exc:  # missing, truncated or damaged files surface as many exception types
        if os.path.isdir(source):
            raise UserError(f"cannot load {what} from folder {source!r}: {first_line(exc)}") from exc
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise UserError(
            f"cannot load {what} {source!r}: not in the HF cache and the hub is unreachable "
            f"(HF_HUB_OFFLINE={offline}): {first_line(exc)}"
        ) from exc


class Backbone(nn.Module):
    """A frozen HF model in eval mode, with its tokenizer, that maps input embeddings to target activations.

    Parameters
    ----------
    model
        The HF base model (``AutoModel``), e.g. ``GPT2Model``.
    tokenizer
        Its tokenizer; used to turn decoded token ids into strings.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.tokenizer = tokenizer
        self._token_strings: dict[int, str] = {}  # token id -> its text, filled by token_strings
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Keep the model in eval mode always: GPT-2's dropout would otherwise make every step noisy."""
        return super().train(False)

    @property
    def n_layer(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def shape(self) -> ModelShape:
        """Layer count and widths that targets are checked against."""
        config = self.model.config
        d_mlp = getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None) or 4 * self.d_model
        return ModelShape(self.n_layer, self.d_model, int(d_mlp), int(config.num_attention_heads))

    @property
    def max_positions(self) -> int | None:
        """The model's context length in tokens, or None if the config does not state one."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if value else None

    @property
    def is_gpt2(self) -> bool:
        return isinstance(self.model, GPT2Model)

    @property
    def vocab_embeddings(self) -> torch.Tensor:
        """Input-embedding rows of the tokens the tokenizer can name, shape (V, d_model)."""
        weight = self.model.get_input_embeddings().weight
        return weight[: min(weight.shape[0], len(self.tokenizer))]

    @property
    def embedding_std(self) -> float:
        """Standard deviation of the input-embedding matrix: the scale of the study's initial embeddings."""
        if not hasattr(self, "_embedding_std"):
            self._embedding_std = float(self.model.get_input_embeddings().weight.detach().std())
        return self._embedding_std

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Decode each token id on its own into its text, e.g. 995 -> ' world'; each id is decoded once per
        backbone (a sweep's analysis asks for millions of them)."""
        known = self._token_strings
        for i in map(int, token_ids):
            if i not in known:
                known[i] = self.tokenizer.decode([i])
        return [known[int(i)] for i in token_ids]

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of integer token ids, shape ``token_ids.shape + (d_model,)``."""
        return self.model.get_input_embeddings()(token_ids)

    def supports(self, target: Target) -> bool:
        """Whether this model can read ``target``: GPT-2 reads every hook, other models ``hook_resid_pre`` only."""
        return self.is_gpt2 or target.hook == "hook_resid_pre"

    def forward(self, inputs_embeds: torch.Tensor, target: Target) -> torch.Tensor:
        """Activation of ``target`` at every position, shape (batch, tokens), for inputs (batch, tokens, d_model)."""
        return self.hook_values(inputs_embeds, target)[..., target.flat_index(self.shape.d_head)]

    def hook_values(self, inputs_embeds: torch.Tensor, target: Target) -> torch.Tensor:
        """Every unit of ``target``'s hook, shape (batch, tokens, hook width), running only what it needs."""
        if not self.is_gpt2:
            return self.residual(inputs_embeds, target.layer)
        return self.gpt2_hook_values(inputs_embeds, target)[0]

    def gpt2_hook_values(self, inputs_embeds: torch.Tensor, target: Target, start: int = 0,
                         past: KeysValues | None = None, keep: KeysValues | None = None, final: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """GPT-2 only: ``target``'s hook values (batch, tokens, width) of positions ``start, ...`` after a prefix
        whose keys and values are ``past`` (``keep`` receives these positions'), and with ``final`` the last
        hidden state after ``ln_f`` (batch, tokens, d_model) from the same pass (else None)."""
        layer = target.layer
        x = _gpt2_residual(self.model, inputs_embeds, layer, start, past, keep)
        values = _gpt2_block_hook(self.model.h[layer], x, target.hook, past, keep, layer)
        if not final:
            return values, None
        return values, self.model.ln_f(_gpt2_blocks(self.model, x, range(layer, self.n_layer), past, keep))

    def lm_logits(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """GPT-2's next-token logits (batch, tokens, V): every block, ``ln_f``, then the tied input embedding."""
        hidden = self.model.ln_f(_gpt2_residual(self.model, inputs_embeds, self.n_layer))
        return hidden @ self.vocab_embeddings.T

    def residual(self, inputs_embeds: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual stream entering block ``layer`` (HF ``hidden_states[layer]``), shape (batch, tokens, d_model)."""
        if self.is_gpt2:
            return _gpt2_residual(self.model, inputs_embeds, layer)
        out = self.model(inputs_embeds=inputs_embeds, output_hidden_states=True, use_cache=False)
        return out.hidden_states[layer]


KeysValues = dict[int, tuple[torch.Tensor, torch.Tensor]]  # block -> attention keys, values (batch, heads, tokens, d_head)


def _gpt2_residual(model: GPT2Model, inputs_embeds: torch.Tensor, n_blocks: int, start: int = 0,
                   past: KeysValues | None = None, keep: KeysValues | None = None) -> torch.Tensor:
    """GPT-2's residual stream after ``n_blocks`` blocks, computed from the HF modules' weights (eval mode).

    ``inputs_embeds`` are positions ``start, start + 1, ...``; ``past`` holds every block's keys and values of the
    positions before ``start`` (a shared prefix), and ``keep``, when given, receives those of these positions.
    """
    x = inputs_embeds + model.wpe.weight[start : start + inputs_embeds.shape[-2]]
    return _gpt2_blocks(model, x, range(n_blocks), past, keep)


def _gpt2_blocks(model: GPT2Model, x: torch.Tensor, blocks: range, past: KeysValues | None = None,
                 keep: KeysValues | None = None) -> torch.Tensor:
    """The residual ``x`` after the blocks ``blocks`` (see ``_gpt2_residual`` for ``past`` and ``keep``)."""
    for i in blocks:
        block = model.h[i]
        x = x + _gpt2_attention(block.attn, block.ln_1(x), past, keep, i)
        x = x + block.mlp.c_proj(_gpt2_mlp_hidden(block.mlp, block.ln_2(x)))
    return x


def _gpt2_block_hook(block: nn.Module, x: torch.Tensor, hook: str, past: KeysValues | None = None,
                     keep: KeysValues | None = None, index: int = 0) -> torch.Tensor:
    """The value of ``hook`` inside ``block`` (block ``index``) for its input residual ``x``; last dim as in
    ``targets.HOOKS``. Runs only as much of the block as the hook needs.
    """
    if hook == "hook_resid_pre":
        return x
    if hook in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(x.shape[-1], dim=-1)
        return {"attn.hook_q": q, "attn.hook_k": k, "attn.hook_v": v}[hook]
    mid = x + _gpt2_attention(block.attn, block.ln_1(x), past, keep, index)
    if hook == "hook_resid_mid":
        return mid
    post_act = _gpt2_mlp_hidden(block.mlp, block.ln_2(mid))
    if hook == "mlp.hook_post":
        return post_act
    assert hook == RESIDUAL_HOOKS[2], hook
    return mid + block.mlp.c_proj(post_act)


def _gpt2_mlp_hidden(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's MLP neurons after the activation (``mlp.hook_post``), shape (batch, tokens, d_mlp).

    HF's ``gelu_new`` runs as six separate ops; ``F.gelu(approximate="tanh")`` is the same function in one
    kernel (max difference 2.4e-7; 1.12x faster steps on 2 CPU cores, benchmarks/explore_speedups.py).
    """
    hidden = mlp.c_fc(x)
    if isinstance(mlp.act, NewGELUActivation):
        return F.gelu(hidden, approximate="tanh")
    return mlp.act(hidden)


def _gpt2_attention(attn: nn.Module, x: torch.Tensor, past: KeysValues | None = None,
                    keep: KeysValues | None = None, index: int = 0) -> torch.Tensor:
    """GPT-2 causal self-attention of ``x`` (batch, tokens, d_model), output projection included.

    With ``past[index]`` (keys and values of p earlier positions), ``x`` holds positions p, p + 1, ... and each
    attends to the earlier positions too; ``keep[index]`` receives the keys and values of ``x``'s positions.
    """
    batch, n_tokens, d_model = x.shape
    q, k, v = attn.c_attn(x).split(d_model, dim=-1)
    heads = lambda t: t.view(batch, n_tokens, attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    if keep is not None:
        keep[index] = (k, v)
    if past is None or index not in past or past[index][0].shape[-2] == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
    else:
        before = past[index][0].shape[-2]
        k, v = torch.cat([past[index][0], k], dim=-2), torch.cat([past[index][1], v], dim=-2)
        mask = torch.arange(before + n_tokens, device=x.device) <= before + torch.arange(n_tokens, device=x.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    return attn.c_proj(out.transpose(1, 2).reshape(batch, n_tokens, d_model))


def load_backbone(model_name_or_path: str, trust_remote_code: bool = False) -> Backbone:
    """Load model and tokenizer from a hub id or a local folder (honours the HF cache and ``HF_HUB_OFFLINE``).

    Raises
    ------
    UserError
        If the folder does not exist, or the model or tokenizer cannot be loaded (e.g. a hub id while offline).
    """
    source = resolve_model_source(model_name_or_path)
    hf_logging.disable_progress_bar()
    model = _load(AutoModel, source, "model", dtype=torch.float32, trust_remote_code=trust_remote_code)
    tokenizer = _load(AutoTokenizer, source, "tokenizer", trust_remote_code=trust_remote_code)
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise UserError(f"model {model_name_or_path!r} has no input embeddings; it cannot take inputs_embeds")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) < rows / 2:  # transformers 5 builds a near-empty tokenizer when its files are missing
        raise UserError(
            f"cannot load tokenizer from {model_name_or_path!r}: it names {len(tokenizer)} tokens but the model has "
            f"{rows} embedding rows; the tokenizer files are missing or damaged"
        )
    return Backbone(model, tokenizer)
