"""What the console shows during a fit: the step progress bar (a terminal) or plain lines (a batch log), and no
chatter that is not about the user's run."""

from __future__ import annotations

import logging
import sys
import time
import warnings

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting optimizer steps out of ``max_steps`` (there are no epochs here)."""

    @property
    def train_description(self) -> str:
        return "steps"

    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self.on_train_epoch_start(trainer)  # a resumed run may start inside its epoch, without that hook

    def on_train_epoch_start(self, trainer, *args) -> None:
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step  # a resumed run continues its count
        self.train_progress_bar.set_description("steps")

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step % self.refresh_rate == 0 or trainer.global_step == trainer.max_steps:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, trainer.lightning_module))
            self.train_progress_bar.refresh()

    def get_metrics(self, trainer, module) -> dict:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)  # the run's folder is printed at the end
        return metrics


class PlainProgress(ProgressBar):
    """The progress of a run whose output is not a terminal (a batch job's log file): one plain line on stderr
    every ``every_s`` seconds, every tenth of the steps, and at the last step, instead of the redrawn bar."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._started = self._shown = 0.0
        self._first_step = 0
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, module) -> None:
        self._started = self._shown = time.monotonic()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer, module, *args) -> None:
        step, total, now = trainer.global_step, trainer.max_steps, time.monotonic()
        tenth = max(1, total // 10)
        if not self._enabled or not (step % tenth == 0 or step == total or now - self._shown >= self.every_s):
            return
        self._shown = now
        rate = (step - self._first_step) / max(now - self._started, 1e-9)
        loss = trainer.callback_metrics.get("loss")
        loss_text = f" loss={float(loss):.4g}" if loss is not None else ""
        print(f"steps: {100 * step // total}% {step}/{total} [{now - self._started:.0f} s, {rate:.3g} steps/s]"
              f"{loss_text}", file=sys.stderr, flush=True)


NOT_ABOUT_THE_RUN = ("GPU available", "TPU available", "HPU available", "💡 Tip", "`Trainer.fit` stopped")


class _DropLightningChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(NOT_ABOUT_THE_RUN)


def quiet_console() -> None:
    """Keep warnings, tips and banners that are not about the user's run out of the console."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        chatter = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningChatter) for f in chatter.filters):
            chatter.addFilter(_DropLightningChatter())
    # token search steps inside an optimizer closure (manual optimization); its checkpoints hold the state after
    # the step on purpose (README, "Checkpoints"), so Lightning's warning and code sample about that stay out
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system")  # README "Clusters"
    for message in (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*",  # the frozen backbone
                    ".*treespec.*", ".*LeafSpec.*", ".*args parameter is intended to run from within Python.*"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
