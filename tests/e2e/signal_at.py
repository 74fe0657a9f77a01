"""Test helper, loaded by the CLI with ``--trainer.callbacks+=signal_at.SignalAt``: this process sends itself a
signal at a fixed point, so interrupt tests do not race a running optimization."""

from __future__ import annotations

import os
import signal as signal_lib
import threading

from lightning.pytorch import Callback


class SignalAt(Callback):
    """Send ``signal`` (a name, e.g. ``SIGINT``) to this process when step ``step`` starts (after the checkpoint
    of step ``step`` was saved), or, with ``step`` -1, ``delay`` seconds into the end-of-fit analysis; under DDP
    only in process ``rank`` (-1: every process)."""

    def __init__(self, signal: str = "SIGINT", step: int = 1, delay: float = 1.0, rank: int = -1) -> None:
        self.signum, self.step, self.delay, self.rank = getattr(signal_lib, signal), step, delay, rank

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (-1, trainer.global_rank):
            os.kill(os.getpid(), self.signum)

    def on_train_end(self, trainer, module) -> None:
        if self.step == -1:  # callbacks given by the user run before the ResultsWriter's analysis starts
            threading.Timer(self.delay, os.kill, (os.getpid(), self.signum)).start()



class PoisonAt(Callback):
    """Make the first row of process ``rank``'s shard NaN, in that process only, when step ``step`` starts."""

    def __init__(self, step: int = 2, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            module.parameter.data[module.layout.shard.start] = float("nan")
