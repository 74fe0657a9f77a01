"""The Lightning glue: ``ActMaxModule`` (steps, logging, DDP, checkpoints), callbacks (interrupts, the end-of-fit
gather, analysis and writing; the sensitivity recorder), the LightningCLI (``cli``) and its progress display,
clusters (``cluster``: srun, torchrun, requeue), run folders (``runs``) and the loop's empty batches (``data``).

May import: base, model, optimize, analysis, report.
"""
