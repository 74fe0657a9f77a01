"""The frozen model and what is read from it: loading and the truncated forward (``backbone``), TransformerLens
target names (``targets``), what a run reads at its hook (``readout``: units, SAE latents, directions), SAELens-format
SAEs (``sae``), rows per chunk from measured memory (``chunking``) and nearest-token decoding (``decode``).

A new target kind goes in ``targets`` (its name) and ``readout`` (what it reads).

May import: base.
"""
