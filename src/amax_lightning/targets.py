"""Target units named the TransformerLens way (``blocks.8.hook_resid_pre:91``), parsed and range-checked."""

from __future__ import annotations

import re
from dataclasses import dataclass

from amax_lightning.errors import UserError

HOOKS = ("hook_resid_pre",)
_SPEC = re.compile(r"^blocks\.(?P<layer>-?[0-9]+)\.(?P<hook>[A-Za-z0-9_.]+):(?P<unit>-?[0-9]+)$")


@dataclass(frozen=True)
class Target:
    """One scalar unit of the model, read at every input position.

    Attributes
    ----------
    layer
        Block index L (0-based). ``hook_resid_pre`` of block L is the residual stream after L blocks,
        i.e. HF ``hidden_states[L]``.
    hook
        TransformerLens hook name inside the block, e.g. ``hook_resid_pre``.
    unit
        Index of the unit along the hook's last dimension (a residual dimension for ``hook_resid_pre``).
    """

    layer: int
    hook: str
    unit: int

    @property
    def spec(self) -> str:
        """The target in the CLI's notation, e.g. ``blocks.8.hook_resid_pre:91``."""
        return f"blocks.{self.layer}.{self.hook}:{self.unit}"

    @property
    def blocks_needed(self) -> int:
        """How many transformer blocks the forward must run to read this target."""
        return self.layer


def parse_target(spec: str, n_layer: int, d_model: int) -> Target:
    """Parse ``blocks.L.<hook>:D`` and check L and D against the model's shape.

    Parameters
    ----------
    spec
        Target spec in TransformerLens naming, e.g. ``blocks.8.hook_resid_pre:91``.
    n_layer
        Number of transformer blocks of the model; L must lie in ``[0, n_layer - 1]``.
    d_model
        Residual stream width; D must lie in ``[0, d_model - 1]``.

    Raises
    ------
    UserError
        On a malformed spec, an unknown hook, or a layer or unit out of range.
    """
    match = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise UserError(f"target {spec!r} is malformed; write blocks.<layer>.<hook>:<unit>, e.g. blocks.8.hook_resid_pre:91")
    layer, hook, unit = int(match["layer"]), match["hook"], int(match["unit"])
    if hook not in HOOKS:
        raise UserError(f"target hook {hook!r} is unknown; allowed: {', '.join(HOOKS)}")
    if not 0 <= layer < n_layer:
        raise UserError(f"target layer {layer} is out of range; this model has blocks 0..{n_layer - 1}")
    if not 0 <= unit < d_model:
        raise UserError(f"target unit {unit} is out of range for {hook}; allowed 0..{d_model - 1}")
    return Target(layer=layer, hook=hook, unit=unit)
