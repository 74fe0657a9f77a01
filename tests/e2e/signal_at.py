"""Test helper, loaded by the CLI with ``--trainer.callbacks+=signal_at.SignalAt``: this process sends itself a
signal at a fixed point, so interrupt tests do not race a running optimization."""

from __future__ import annotations

import os
import signal as signal_lib
import time

from lightning.pytorch import Callback


class SignalAt(Callback):
    """Send ``signal`` (a name, e.g. ``SIGINT``) to this process when step ``step`` starts (after the checkpoint
    of step ``step`` was saved), or, with ``step`` -1, when the end-of-fit analysis starts decoding the null
    model's random directions (whatever the machine's speed), or, with ``step`` -2, once a sweep's analysis has
    written ``blocks`` blocks in this process; under DDP only in process ``rank`` (-1: every process)."""

    def __init__(self, signal: str = "SIGINT", step: int = 1, rank: int = -1, blocks: int = 1) -> None:
        self.signum, self.step, self.rank, self.blocks = getattr(signal_lib, signal), step, rank, blocks

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (-1, trainer.global_rank):
            os.kill(os.getpid(), self.signum)

    def on_train_end(self, trainer, module) -> None:
        if self.step == -1:  # callbacks given by the user run before the ResultsWriter's analysis starts
            import amax_lightning.analysis.null_model as null_model

            decode = null_model.null_token_ids

            def signal_then_decode(*args, **kwargs):
                os.kill(os.getpid(), self.signum)
                return decode(*args, **kwargs)

            null_model.null_token_ids = signal_then_decode
        if self.step == -2 and self.rank in (-1, trainer.global_rank):
            import amax_lightning.analysis.sweep as sweep

            write, written = sweep.write_table, []

            def write_then_signal(path, *args, **kwargs):
                write(path, *args, **kwargs)
                written.extend([path] if "/units-" in path else [])
                if len(written) == self.blocks:
                    os.kill(os.getpid(), self.signum)

            sweep.write_table = write_then_signal



class PoisonAt(Callback):
    """Make the first row of process ``rank``'s shard NaN, in that process only, when step ``step`` starts."""

    def __init__(self, step: int = 2, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            module.parameter.data[module.layout.shard.start] = float("nan")


class WaitAt(Callback):
    """At the start of step ``step``, in rank 0 only, create the file ``marker`` and wait (at most ``limit`` seconds)
    until this process has received a signal that the run defers (``DeferInterrupts``): a test sends a real signal
    from outside (``scancel --signal``, ``scontrol requeue``) at a known step."""

    def __init__(self, marker: str = "at_step", step: int = 6, limit: float = 60.0) -> None:
        self.marker, self.step, self.limit = marker, step, limit

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        from amax_lightning.lightning.callbacks import DeferInterrupts, find_callback

        interrupts = find_callback(trainer, DeferInterrupts)
        open(self.marker, "w").close()
        deadline = time.monotonic() + self.limit
        while time.monotonic() < deadline and not (interrupts.pending or interrupts.sigterm or interrupts.sigusr1):
            time.sleep(0.05)


class WaitInAnalysis(Callback):
    """In rank 0, once a sweep's analysis has written its first block, create the file ``marker`` and wait (at most
    ``limit`` seconds) for a signal from outside (``scancel --signal``), which interrupts the analysis at once."""

    def __init__(self, marker: str = "in_analysis", limit: float = 120.0) -> None:
        self.marker, self.limit = marker, limit

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_rank != 0:
            return
        import amax_lightning.analysis.sweep as sweep

        write, marker, limit = sweep.write_table, self.marker, self.limit

        def write_then_wait(path, *args, **kwargs):
            write(path, *args, **kwargs)
            if "/units-" in path and not os.path.exists(marker):
                open(marker, "w").close()
                deadline = time.monotonic() + limit
                while time.monotonic() < deadline:
                    time.sleep(0.05)

        sweep.write_table = write_then_wait
