"""Target units named the TransformerLens way (``blocks.8.hook_resid_pre:91``), parsed and range-checked.

Hooks of block L (GPT-2 names; ``d`` = residual width, ``d_mlp`` = MLP width, ``H`` heads of ``d_head`` dims):

==================  =========================================================  ==============
hook                value                                                      unit
==================  =========================================================  ==============
hook_resid_pre      residual stream entering block L (HF ``hidden_states[L]``)  D < d
hook_resid_mid      after block L's attention, before its MLP                   D < d
hook_resid_post     after block L's MLP (before ``ln_f`` for the last block)    D < d
mlp.hook_post       block L's MLP neuron after the activation function          N < d_mlp
attn.hook_q/k/v     query / key / value of head H, dimension D                  H.D
==================  =========================================================  ==============
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from amax_lightning.base.errors import UserError

RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
HEAD_HOOKS = ("attn.hook_q", "attn.hook_k", "attn.hook_v")
HOOKS = (*RESIDUAL_HOOKS, "mlp.hook_post", *HEAD_HOOKS)
_SPEC = re.compile(r"^blocks\.(?P<layer>-?[0-9]+)\.(?P<hook>[A-Za-z0-9_.]+):(?P<unit>-?[0-9]+(\.-?[0-9]+)?)$")


@dataclass(frozen=True)
class ModelShape:
    """The sizes a target is checked against."""

    n_layer: int
    d_model: int
    d_mlp: int
    n_head: int

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head


@dataclass(frozen=True)
class Target:
    """One scalar unit of the model, read at every input position.

    Attributes
    ----------
    layer
        Block index L (0-based).
    hook
        TransformerLens hook name inside the block, one of ``HOOKS``.
    unit
        ``(D,)`` for residual and MLP hooks, ``(H, D)`` for attention q/k/v hooks.
    """

    layer: int
    hook: str
    unit: tuple[int, ...]
    label: str | None = None  # the name of an SAE latent or direction unit; None for a model unit

    @property
    def spec(self) -> str:
        """The target in the CLI's notation, e.g. ``blocks.8.hook_resid_pre:91`` or ``sae:./my-sae:17``."""
        return self.label or f"blocks.{self.layer}.{self.hook}:{'.'.join(map(str, self.unit))}"

    def flat_index(self, d_head: int) -> int:
        """Index along the hook's last dimension; q/k/v of head H dim D sit at ``H * d_head + D``."""
        return self.unit[0] * d_head + self.unit[1] if len(self.unit) == 2 else self.unit[0]


def parse_target(spec: str, shape: ModelShape) -> Target:
    """Parse ``blocks.L.<hook>:<unit>`` and check layer and unit against the model's shape.

    Parameters
    ----------
    spec
        Target spec in TransformerLens naming, e.g. ``blocks.8.hook_resid_pre:91`` or ``blocks.3.attn.hook_q:2.17``.
    shape
        The model's sizes; L must lie in ``[0, n_layer - 1]`` and the unit inside the hook's width.

    Raises
    ------
    UserError
        On a malformed spec, an unknown hook, or a layer or unit out of range.
    """
    match = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise UserError(
            f"target {spec!r} is malformed; write blocks.<layer>.<hook>:<unit>, "
            "e.g. blocks.8.hook_resid_pre:91 or blocks.3.attn.hook_q:2.17"
        )
    layer, hook = int(match["layer"]), match["hook"]
    unit = tuple(int(part) for part in match["unit"].split("."))
    if hook not in HOOKS:
        raise UserError(f"target hook {hook!r} is unknown; allowed: {', '.join(HOOKS)}")
    if not 0 <= layer < shape.n_layer:
        raise UserError(f"target layer {layer} is out of range; this model has blocks 0..{shape.n_layer - 1}")
    if hook in HEAD_HOOKS:
        if len(unit) != 2:
            raise UserError(f"target unit {match['unit']!r} of {hook} must be <head>.<dim>, e.g. 2.17")
        limits = (("head", shape.n_head), ("dim", shape.d_head))
    else:
        if len(unit) != 1:
            raise UserError(f"target unit {match['unit']!r} of {hook} must be one integer")
        limits = (("unit", hook_width(hook, shape)),)
    for value, (name, size) in zip(unit, limits):
        if not 0 <= value < size:
            raise UserError(f"target {name} {value} is out of range for {hook}; allowed 0..{size - 1}")
    return Target(layer=layer, hook=hook, unit=unit)


def hook_width(hook: str, shape: ModelShape) -> int:
    """The last dimension of ``hook``'s values: d_mlp for ``mlp.hook_post``, else d_model (q/k/v: all heads)."""
    return shape.d_mlp if hook == "mlp.hook_post" else shape.d_model


def unit_indices(units: str, width: int, what: str = "unit") -> list[int]:
    """Indices named by ``91``, ``*`` (all of ``width``), ``0-127`` (inclusive) or ``3,17,91``, checked in range.

    Raises
    ------
    UserError
        On a malformed list, an empty range, an index out of ``0..width-1`` or a repeat.
    """
    units = units.strip()
    if units == "*" or _UNIT_RANGE.match(units):
        ids = list(_expand(units, width))
    else:
        parts = [part.strip() for part in units.strip("[]").split(",")]
        if not all(part.isascii() and part.isdigit() for part in parts):
            raise UserError(f"{what}s {units!r} are malformed; use *, 0-127 or 3,17,91")
        ids = [int(part) for part in parts]
    bad = [i for i in ids if i >= width]
    if bad:
        raise UserError(f"{what} {bad[0]} is out of range; allowed 0..{width - 1}")
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise UserError(f"{what}s {units!r} repeat {repeated}; each may appear once")
    return ids


_MANY = re.compile(r"^(?P<prefix>blocks\.[^:]+):(?P<units>.*)$")
_UNIT_RANGE = re.compile(r"^([0-9]+)-([0-9]+)$")
_HEAD_UNITS = re.compile(r"^(?P<head>[0-9]+)\.(?P<dims>\*|[0-9]+-[0-9]+)$")


def parse_targets(spec: str, shape: ModelShape) -> list[Target]:
    """Parse a target spec that may name many units of one hook.

    Residual and MLP hooks: ``...:91``, ``...:*`` (every unit), ``...:0-127`` (inclusive), ``...:3,17,91`` or
    ``...:[3,17,91]``. Attention q/k/v: ``...:2.17``, ``...:*`` (every head and dim), ``...:2.*`` (every dim
    of head 2), ``...:2.0-15``, ``...:2.17,3.4``. Returns the targets in the order given (ranges ascending).

    Raises
    ------
    UserError
        As ``parse_target`` does for each unit, and on an empty range, a malformed or repeated unit list.
    """
    match = _MANY.match(spec.strip()) if isinstance(spec, str) else None
    units = match["units"].strip() if match else ""
    if match is None or not any(mark in units for mark in "*-,[") or units.startswith("-") and units[1:].isdigit():
        return [parse_target(spec, shape)]
    head_hook = match["prefix"].endswith(HEAD_HOOKS)
    first = parse_target(f"{match['prefix']}:{'0.0' if head_hook else '0'}", shape)
    targets = [parse_target(f"{match['prefix']}:{name}", shape) for name in _unit_names(units, first.hook, shape)]
    repeated = sorted(".".join(map(str, u)) for u, n in Counter(t.unit for t in targets).items() if n > 1)
    if repeated:
        raise UserError(f"target units {units!r} repeat {', '.join(repeated)}; each unit may appear once")
    return targets


def _unit_names(units: str, hook: str, shape: ModelShape) -> list[str]:
    """The single-unit names (``91`` or ``2.17``) a many-unit spec of ``hook`` stands for."""
    if hook in HEAD_HOOKS:
        if units == "*":
            return [f"{h}.{d}" for h in range(shape.n_head) for d in range(shape.d_head)]
        head = _HEAD_UNITS.match(units)
        if head:
            return [f"{head['head']}.{d}" for d in _expand(head["dims"], shape.d_head)]
        item = re.compile(r"^[0-9]+\.[0-9]+$")
        example = "*, 2.*, 2.0-15 or 2.17,3.4"
    else:
        if units == "*" or _UNIT_RANGE.match(units):
            return [str(i) for i in _expand(units, hook_width(hook, shape))]
        item = re.compile(r"^[0-9]+$")
        example = "*, 0-127 or 3,17,91"
    parts = [part.strip() for part in units.strip("[]").split(",")]
    if not all(part.isascii() and item.match(part) for part in parts):
        raise UserError(f"target units {units!r} are malformed; use {example}")
    return parts


def _expand(units: str, width: int) -> range:
    """``*`` -> every index below ``width``; ``low-high`` -> low..high inclusive."""
    if units == "*":
        return range(width)
    low, high = (int(x) for x in _UNIT_RANGE.match(units).groups())
    if high < low:
        raise UserError(f"target units {units!r} are an empty range; write low-high, e.g. 0-127")
    return range(low, high + 1)

