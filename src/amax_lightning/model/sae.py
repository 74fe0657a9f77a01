"""Sparse autoencoders in SAELens's on-disk format, read with ``safetensors`` and ``json`` (no sae-lens dependency).

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec``
[d_sae, d_in], ``b_dec`` [d_in], optionally ``scaling_factor``). ``cfg.json`` comes in three generations: pre-5
(``hook_point``, maybe no ``d_sae``), 5.x flat (``hook_name``, ``d_sae``, ...), 6.x (``hook_name``, ``prepend_bos``,
``neuronpedia_id`` inside ``metadata``). The encoder, as sae-lens's standard SAE computes it:
``pre = (x - b_dec) @ W_enc + b_enc`` (``hook_sae_acts_pre``; without ``apply_b_dec_to_input``: ``x @ W_enc + b_enc``)
and ``post = relu(pre)`` (``hook_sae_acts_post``), after the configured input normalization.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from amax_lightning.base.errors import UserError, first_line

NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")
JB_RELEASE = "jbloom/GPT2-Small-SAEs-Reformatted"  # gpt2-small-res-jb: trained on TransformerLens's centred residual
WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"


@dataclass(frozen=True)
class SAE:
    """The encoder of a standard (ReLU) SAE, and what its config says about where and how it reads.

    Attributes
    ----------
    source
        The folder or hub id it was loaded from.
    hook_name
        TransformerLens hook it reads, e.g. ``blocks.8.hook_resid_pre``.
    W_enc, b_enc, b_dec, W_dec
        Encoder weights [d_in, d_sae], bias [d_sae], decoder bias [d_in] and decoder weights [d_sae, d_in] (None
        if the file lacks them), fp32.
    apply_b_dec_to_input
        Whether ``b_dec`` is subtracted from the input before encoding.
    normalize_activations
        ``none``, ``layer_norm`` or ``constant_norm_rescale``.
    centre_writing_weights
        What the config says about TransformerLens's ``center_writing_weights`` (None: not stated).
    generation
        ``pre-5``, ``5.x`` or ``6.x``: which cfg.json layout it had.
    neuronpedia_id
        E.g. ``gpt2-small/8-res-jb``, or None.
    has_scaling_factor
        The file holds ``scaling_factor``; it scales only the decoder's input, so it is ignored for latent targets.
    """

    source: str
    hook_name: str
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    W_dec: torch.Tensor | None
    apply_b_dec_to_input: bool
    normalize_activations: str
    centre_writing_weights: bool | None
    generation: str
    neuronpedia_id: str | None
    has_scaling_factor: bool

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def centre_residual(self) -> tuple[bool, str]:
        """Whether the residual this SAE was trained on is HF's minus its mean over d_model, and why (``auto``)."""
        if self.centre_writing_weights is not None:
            return self.centre_writing_weights, f"cfg.json says center_writing_weights={self.centre_writing_weights}"
        if self.source.rstrip("/").startswith(JB_RELEASE) or JB_RELEASE in self.source:
            return True, f"the {JB_RELEASE} release was trained with center_writing_weights=True"
        if self.generation == "pre-5":
            return True, "pre-5 SAELens configs processed the model (center_writing_weights=True) by default"
        return False, "cfg.json does not ask for centred writing weights (SAELens's default today)"

    def aligned_latents(self, dim: int, k: int) -> list[int]:
        """The ``k`` latents whose decoder directions have the largest cosine with basis vector ``dim``, best first."""
        if self.W_dec is None:
            raise UserError(f"SAE {self.source!r} has no W_dec, so no decoder directions to align")
        if not 0 <= dim < self.d_in or not 1 <= k <= self.d_sae:
            raise UserError(f"top{k}@{dim} is out of range for SAE {self.source!r}: dim 0..{self.d_in - 1}, "
                            f"k 1..{self.d_sae}")
        cosine = self.W_dec[:, dim] / self.W_dec.norm(dim=-1).clamp_min(1e-12)
        return torch.sort(cosine, descending=True, stable=True).indices[:k].tolist()

    def neuronpedia_url(self, latent: int) -> str | None:
        """The latent's Neuronpedia page, when the config names the SAE's Neuronpedia id."""
        return f"https://www.neuronpedia.org/{self.neuronpedia_id}/{latent}" if self.neuronpedia_id else None


def normalize_input(x: torch.Tensor, how: str) -> torch.Tensor:
    """The hook's vectors (..., d_in) normalized as sae-lens does before encoding (``NORMALIZATIONS``)."""
    if how == "layer_norm":
        x = x - x.mean(dim=-1, keepdim=True)
        return x / (x.std(dim=-1, keepdim=True) + 1e-5)
    if how == "constant_norm_rescale":
        return x * (x.shape[-1] ** 0.5) / x.norm(dim=-1, keepdim=True)
    return x


def resolve_sae_folder(source: str) -> str:
    """A local folder as is; else a hub id ``owner/repo`` or ``owner/repo/sub/folder`` fetched through the HF hub
    client (its cache, and ``HF_HUB_OFFLINE``)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return path
    parts = source.strip("/").split("/")
    if source.startswith((".", "/", "~")) or len(parts) < 2:
        raise UserError(f"SAE {source!r} is not a folder; give a folder with cfg.json and {WEIGHTS}, or a hub id")
    from huggingface_hub import snapshot_download

    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = [f"{sub}/{name}" if sub else name for name in (CONFIG, WEIGHTS)]
    try:
        root = snapshot_download(repo, allow_patterns=patterns)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise UserError(f"cannot load SAE {source!r}: not in the HF cache and the hub is unreachable "
                        f"(HF_HUB_OFFLINE={offline}): {first_line(exc)}") from exc
    folder = os.path.join(root, sub)
    if not os.path.isdir(folder):
        raise UserError(f"SAE {source!r}: the hub repo {repo!r} has no folder {sub!r}")
    return folder


def _config(folder: str, source: str) -> dict:
    path = os.path.join(folder, CONFIG)
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"SAE {source!r} has no {CONFIG}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"SAE {source!r}: {CONFIG} is not valid JSON: {first_line(exc)}") from exc
    if not isinstance(config, dict):
        raise UserError(f"SAE {source!r}: {CONFIG} must hold a JSON object")
    return config


def _weights(folder: str, source: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(path):
        raise UserError(f"SAE {source!r} has no {WEIGHTS}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"SAE {source!r}: {WEIGHTS} cannot be read as safetensors: {first_line(exc)}") from exc
    missing = [name for name in ("W_enc", "b_enc", "b_dec") if name not in tensors]
    if missing:
        raise UserError(f"SAE {source!r}: {WEIGHTS} lacks {', '.join(missing)}")
    return tensors


def load_sae(source: str) -> SAE:
    """Read a standard SAE from a folder or hub id; a one-line UserError for anything it cannot use."""
    folder = resolve_sae_folder(source)
    config = _config(folder, source)
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
    generation = "6.x" if metadata else ("5.x" if "hook_name" in config else "pre-5")
    hook_name = metadata.get("hook_name") or config.get("hook_name") or config.get("hook_point")
    if not isinstance(hook_name, str) or not hook_name:
        raise UserError(f"SAE {source!r}: {CONFIG} names no hook (hook_name, or hook_point in older files)")
    architecture = config.get("architecture", "standard")
    if architecture != "standard":
        raise UserError(f"SAE {source!r} has architecture {architecture!r}; supported: standard (ReLU)")
    activation = config.get("activation_fn_str", config.get("activation_fn", "relu"))
    if activation not in ("relu", None):  # 5.x files may say standard with a TopK or tanh-relu activation
        raise UserError(f"SAE {source!r} has activation {activation!r}; supported: relu (the standard SAE)")
    normalize = config.get("normalize_activations", "none")
    if not isinstance(normalize, (str, bool, type(None))):
        raise UserError(f"SAE {source!r}: normalize_activations {normalize!r} must be a string")
    normalize = {False: "none", None: "none", True: "expected_average_only_in"}.get(normalize, normalize)
    apply_b_dec = config.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise UserError(f"SAE {source!r}: apply_b_dec_to_input {apply_b_dec!r} must be true or false")
    if normalize not in NORMALIZATIONS:
        raise UserError(f"SAE {source!r} has normalize_activations {normalize!r}, which needs statistics the folder "
                        f"does not hold; supported: {', '.join(NORMALIZATIONS)}")
    tensors = _weights(folder, source)
    W_enc, b_enc, b_dec = (tensors[name].float() for name in ("W_enc", "b_enc", "b_dec"))
    if W_enc.ndim != 2 or b_enc.shape != (W_enc.shape[1],) or b_dec.shape != (W_enc.shape[0],):
        raise UserError(f"SAE {source!r}: weight shapes W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
                        f"b_dec {tuple(b_dec.shape)} do not fit [d_in, d_sae], [d_sae], [d_in]")
    for name, declared in (("d_in", config.get("d_in")), ("d_sae", config.get("d_sae"))):
        actual = W_enc.shape[0 if name == "d_in" else 1]
        if declared is not None and declared != actual:
            raise UserError(f"SAE {source!r}: {CONFIG} says {name} {declared} but W_enc has {actual}")
    W_dec = tensors["W_dec"].float() if "W_dec" in tensors else None
    if W_dec is not None and W_dec.shape != (W_enc.shape[1], W_enc.shape[0]):
        raise UserError(f"SAE {source!r}: W_dec has shape {tuple(W_dec.shape)}; it must be [d_sae, d_in] = "
                        f"{[W_enc.shape[1], W_enc.shape[0]]}")
    named = {"W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "W_dec": W_dec}  # W_dec picks top-k@dim latents
    damaged = [name for name, t in named.items() if t is not None and not bool(torch.isfinite(t).all())]
    if damaged:
        raise UserError(f"SAE {source!r}: {WEIGHTS} holds NaN or infinite values in {', '.join(damaged)}")
    kwargs = metadata.get("model_from_pretrained_kwargs") or config.get("model_from_pretrained_kwargs") or {}
    centre = kwargs.get("center_writing_weights") if isinstance(kwargs, dict) else None
    return SAE(
        source=source, hook_name=hook_name, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec,
        W_dec=W_dec,
        apply_b_dec_to_input=apply_b_dec, normalize_activations=normalize,
        centre_writing_weights=None if centre is None else bool(centre), generation=generation,
        neuronpedia_id=metadata.get("neuronpedia_id") or config.get("neuronpedia_id"),
        has_scaling_factor="scaling_factor" in tensors,
    )
