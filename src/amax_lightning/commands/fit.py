"""``python -m amax_lightning fit ...``: one study (or a sweep) in this process, through ``AmaxCLI``."""

from __future__ import annotations

from amax_lightning.lightning.callbacks import ResultsWriter, find_callback
from amax_lightning.lightning.cli import run_trainer


def run(args: list[str] | None = None) -> ResultsWriter | None:
    """Run ``fit ...`` in this process; return its ResultsWriter (``results_path``, ``results``), or None.

    Raises UserError (and Lightning's MisconfigurationException) for user mistakes.
    """
    trainer = run_trainer(args)
    return find_callback(trainer, ResultsWriter) if trainer else None
