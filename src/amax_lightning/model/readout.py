"""What a run reads from its hook: model units, SAE latents, or projections onto directions (lucent's objectives).

``build_readout(spec, backbone, ...)`` turns a target spec into the run's targets (one per unit, in row order) and a
``Readout``: an nn.Module mapping the hook's values (rows, n_tokens, width) to each row's own unit (rows, n_tokens).

========================================  ======================================================================
spec                                      each unit reads
========================================  ======================================================================
``blocks.L.<hook>:<units>``               the hook's coordinate(s) (``model/targets.py``)
``sae:<folder or hub id>:<latents>``      the SAE latent's pre-activation (``hook_sae_acts_pre``), or with
                                          ``sae_activation post`` its ReLU (``hook_sae_acts_post``); latents
                                          ``17``, ``*``, ``0-127``, ``3,17,91``, or ``top8@91``: the 8 whose
                                          decoder directions have the largest cosine with residual dim 91
``blocks.L.<hook>@<file.npy>``            the hook's vector projected on the direction in the file, normalized
                                          to unit length; a (k, d) array sweeps its k rows
========================================  ======================================================================

Residual-stream hooks are centred (minus their mean over d_model, as TransformerLens's ``center_writing_weights``
makes them) when ``center_residual`` says so; ``auto`` centres exactly when an SAE was trained on a centred residual.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from amax_lightning.base.checks import check_choice
from amax_lightning.base.errors import UserError, first_line
from amax_lightning.model.backbone import Backbone
from amax_lightning.model.sae import SAE, load_sae, normalize_input
from amax_lightning.model.targets import HOOKS, RESIDUAL_HOOKS, Target, hook_width, parse_targets, unit_indices

SAE_ACTIVATIONS = ("pre", "post")
CENTRE_CHOICES = ("auto", "true", "false")
_ALIGNED = re.compile(r"^top(?P<k>[0-9]+)@(?P<dim>[0-9]+)$")  # the k latents whose decoder rows align with a dim
_HOOK_NAME = re.compile(r"^blocks\.(?P<layer>[0-9]+)\.(?P<hook>[A-Za-z0-9_.]+)$")


@dataclass(frozen=True)
class Centring:
    """Whether residual-stream values are centred over d_model before they are read, and why."""

    applied: bool
    reason: str


class Readout(nn.Module):
    """Each row's unit from the hook's values: unit u of the run is ``unit_ids[u]``, a column of the hook's values
    (``weights`` None) or a row of ``weights``, read as ``x . weights[id] + bias[id]`` (then ReLU when ``relu``).
    ``x`` is the hook's vector, centred over its width when ``centre``, normalized as ``normalize`` says
    (``sae.normalize_input``), minus ``offset`` when given (an SAE's ``b_dec``). Row r reads unit ``r // n_seeds``.
    ``writes`` (units, width) is what each unit writes into the hook's space (an SAE's decoder rows, a direction);
    a unit without ``weights`` writes its own coordinate.
    """

    def __init__(self, unit_ids: list[int], n_seeds: int, centre: bool = False, weights: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, offset: torch.Tensor | None = None, normalize: str = "none",
                 relu: bool = False, writes: torch.Tensor | None = None) -> None:
        super().__init__()
        self.centre, self.normalize, self.relu = centre, normalize, relu
        ids = torch.tensor(unit_ids, dtype=torch.long)
        self.register_buffer("unit_ids", ids, persistent=False)
        self.register_buffer("row_units", ids.repeat_interleave(n_seeds), persistent=False)
        self.register_buffer("weights", weights, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("offset", offset, persistent=False)  # on the run's device, like the weights
        self.writes = writes  # kept on the CPU: only the end-of-fit analysis reads it

    def written_directions(self, width: int) -> torch.Tensor | None:
        """Each unit's vector in the hook's space, shape (units, width): its decoder row, direction or one-hot
        coordinate; None when an SAE has no decoder."""
        if self.weights is None:
            return torch.nn.functional.one_hot(self.unit_ids.cpu(), width).float()
        return self.writes

    def transform(self, values: torch.Tensor) -> torch.Tensor:
        """The hook's values as the units see them: centred if asked, normalized, minus the offset."""
        if self.centre:
            values = values - values.mean(dim=-1, keepdim=True)
        values = normalize_input(values, self.normalize)
        return values if self.offset is None else values - self.offset.to(values.dtype)

    def forward(self, values: torch.Tensor, rows: slice) -> torch.Tensor:
        """Each row's unit at every position, shape (rows, n_tokens), from the hook's values (rows, n_tokens, width)."""
        return self.read(values, self.row_units[rows])

    def read_unit(self, values: torch.Tensor, unit: int) -> torch.Tensor:
        """The run's unit ``unit`` for every input, shape (batch, n_tokens), from values (batch, n_tokens, width)."""
        return self.read(values, self.unit_ids[unit].expand(values.shape[0]))

    def read_units(self, values: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
        """The run's units ``units`` (positions in the run; default: all) for every input and position, shape
        (batch, n_tokens, len(units)), from values (batch, n_tokens, width): a corpus pass reads them all at once."""
        values = self.transform(values)
        ids = self.unit_ids if units is None else self.unit_ids[units.to(self.unit_ids.device)]
        if self.weights is None:
            return values[..., ids]
        out = values @ self.weights[ids].to(values.dtype).T
        if self.bias is not None:
            out = out + self.bias[ids].to(out.dtype)
        return torch.relu(out) if self.relu else out

    def read(self, values: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Unit ``units[i]`` of input i at every position, shape (batch, n_tokens)."""
        values = self.transform(values)
        if self.weights is None:
            return values.gather(-1, units.view(-1, 1, 1).expand(-1, values.shape[1], 1)).squeeze(-1)
        out = torch.einsum("rtd,rd->rt", values, self.weights[units].to(values.dtype))
        if self.bias is not None:
            out = out + self.bias[units].to(out.dtype)[:, None]
        return torch.relu(out) if self.relu else out


@dataclass(frozen=True)
class BuiltReadout:
    """A target spec, resolved: the units (row order of units), their readout, and what results.json records."""

    targets: list[Target]
    readout: Readout
    records: list[dict | None]  # per unit: the SAE or direction it reads (None for a model unit)


def build_readout(spec: str, backbone: Backbone, n_seeds: int, sae_activation: str = "pre",
                  center_residual: str = "auto") -> BuiltReadout:
    """Resolve ``spec`` for ``backbone`` and ``n_seeds`` seeds per unit: its units, their readout, their records.

    Raises
    ------
    UserError
        On a malformed spec, an SAE or direction file that cannot be used, or a unit out of range.
    """
    check_choice("sae_activation", sae_activation, SAE_ACTIVATIONS)
    check_choice("center_residual", center_residual, CENTRE_CHOICES)
    spec = spec.strip() if isinstance(spec, str) else spec
    if isinstance(spec, str) and spec.startswith("sae:"):
        return _sae_readout(spec, backbone, n_seeds, sae_activation, center_residual)
    if isinstance(spec, str) and "@" in spec:
        return _direction_readout(spec, backbone, n_seeds, center_residual)
    targets = parse_targets(spec, backbone.shape)
    centring = _centring(center_residual, targets[0].hook, None)
    columns = [t.flat_index(backbone.shape.d_head) for t in targets]
    return BuiltReadout(targets, Readout(columns, n_seeds, centring.applied), [None] * len(targets))


def _centring(choice: str, hook: str, sae: SAE | None) -> Centring:
    if hook not in RESIDUAL_HOOKS:
        return Centring(False, f"{hook} is not a residual-stream hook; only those are ever centred")
    if choice != "auto":
        return Centring(choice == "true", f"--model.center_residual {choice}")
    if sae is None:
        return Centring(False, "auto: no SAE, so HF's residual as it is")
    applied, reason = sae.centre_residual()
    return Centring(applied, f"auto: {reason}")


def _hook_of(name: str, backbone: Backbone, what: str) -> tuple[int, str]:
    match = _HOOK_NAME.match(name)
    if match is None or match["hook"] not in HOOKS:
        raise UserError(f"{what} reads hook {name!r}; supported: blocks.<layer>.<hook> with hook one of {', '.join(HOOKS)}")
    layer, hook = int(match["layer"]), match["hook"]
    if not 0 <= layer < backbone.n_layer:
        raise UserError(f"{what} reads layer {layer}; this model has blocks 0..{backbone.n_layer - 1}")
    if not backbone.supports(Target(layer, hook, (0,))):
        raise UserError(f"{what} reads {hook!r}, which needs a GPT-2 model; this model offers hook_resid_pre")
    return layer, hook


def _sae_readout(spec: str, backbone: Backbone, n_seeds: int, activation: str, center_residual: str) -> BuiltReadout:
    source, _, latents = spec[len("sae:"):].rpartition(":")
    if not source or not latents:
        raise UserError(f"target {spec!r} is malformed; write sae:<folder or hub id>:<latent>, e.g. sae:./my-sae:91")
    sae = load_sae(source)
    layer, hook = _hook_of(sae.hook_name, backbone, f"SAE {source!r}")
    width = hook_width(hook, backbone.shape)
    if sae.d_in != width:
        raise UserError(f"SAE {source!r} has d_in {sae.d_in} but {sae.hook_name} is {width} wide in this model")
    aligned = _ALIGNED.match(latents.strip())
    if aligned:
        ids = sae.aligned_latents(int(aligned["dim"]), int(aligned["k"]))
    else:
        ids = unit_indices(latents, sae.d_sae, "SAE latent")
    centring = _centring(center_residual, hook, sae)
    targets = [Target(layer, hook, (i,), label=f"sae:{source}:{i}") for i in ids]
    weights, bias = sae.W_enc.T[ids].contiguous(), sae.b_enc[ids].clone()  # only the swept latents' rows
    record = {"source": source, "hook": sae.hook_name, "d_sae": sae.d_sae, "activation": activation,
              "hook_point": f"hook_sae_acts_{activation}", "config_generation": sae.generation,
              "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": sae.normalize_activations,
              "center_residual": centring.applied, "center_reason": centring.reason,
              "scaling_factor": "ignored: it scales only the decoder's input" if sae.has_scaling_factor else None}
    records = [{**record, "latent": i, "neuronpedia": sae.neuronpedia_url(i)} for i in ids]

    offset = sae.b_dec.clone() if sae.apply_b_dec_to_input else None
    writes = sae.W_dec[ids].clone() if sae.W_dec is not None else None
    readout = Readout(list(range(len(ids))), n_seeds, centring.applied, weights, bias, offset,
                      sae.normalize_activations, relu=activation == "post", writes=writes)
    return BuiltReadout(targets, readout, records)


def _direction_readout(spec: str, backbone: Backbone, n_seeds: int, center_residual: str) -> BuiltReadout:
    site, _, path = spec.partition("@")
    layer, hook = _hook_of(site, backbone, f"target {spec!r}")
    width = hook_width(hook, backbone.shape)
    if not os.path.isfile(path):
        raise UserError(f"direction file {path!r} is not a file; give a .npy file of shape (d,) or (k, d)")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"direction file {path!r} cannot be read as .npy: {first_line(exc)}") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise UserError(f"direction file {path!r} is an .npz archive; give one .npy array of shape (d,) or (k, d)")
    real = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if array.ndim not in (1, 2) or array.shape[-1] != width or array.size == 0 or not real:
        raise UserError(f"direction file {path!r} has shape {array.shape} ({array.dtype}); {site} needs real numbers "
                        f"of shape ({width},) or (k, {width})")
    rows = torch.as_tensor(np.atleast_2d(array), dtype=torch.float64)
    norms = rows.norm(dim=-1)
    if not bool(torch.isfinite(rows).all()) or bool((norms == 0).any()):
        raise UserError(f"direction file {path!r} holds a zero, NaN or infinite direction")
    centring = _centring(center_residual, hook, None)
    labels = [spec] if array.ndim == 1 else [f"{spec}[{i}]" for i in range(len(rows))]
    targets = [Target(layer, hook, (i,), label=label) for i, label in enumerate(labels)]
    records = [{"file": path, "index": None if array.ndim == 1 else i, "norm": float(norms[i]),
                "normalized": "projected on the direction divided by its norm"} for i in range(len(rows))]
    unit = (rows / norms[:, None]).float()
    readout = Readout(list(range(len(rows))), n_seeds, centring.applied, unit, writes=unit)
    return BuiltReadout(targets, readout, records)
