"""``AmaxCLI``: LightningCLI with the study's defaults, ``--seed`` / ``--seeds``, input checks, run folders, checkpoints
read safely; ``run_trainer`` builds it and runs the fit."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional, Union

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from amax_lightning.analysis.null_model import check_null_size
from amax_lightning.base.checks import check_int
from amax_lightning.base.errors import UserError, first_line
from amax_lightning.base.seeds import parse_seeds
from amax_lightning.lightning import cluster
from amax_lightning.lightning.callbacks import DeferInterrupts, ResultsWriter, find_callback
from amax_lightning.lightning.module import DEFAULT_SEEDS, ActMaxModule
from amax_lightning.lightning.progress import PlainProgress, StepProgressBar, quiet_console
from amax_lightning.lightning.runs import RunLogger, find_last_checkpoint

DEFAULT_THREADS = torch.get_num_threads()  # torch's choice at start-up
MAX_STEPS = 10_000_000  # optimizer steps; the activation history keeps one value per row and step

STUDY_DEFAULTS = {
    "trainer.max_steps": 500,
    "trainer.log_every_n_steps": 10,
    "checkpoint.every_n_train_steps": 50,  # resumable: last.ckpt every 50 steps, at the end and on interrupt
    "checkpoint.save_last": True,
    "checkpoint.save_top_k": 0,
    "trainer.enable_model_summary": False,  # a frozen backbone and one parameter: the table says nothing new
}


def choose_seeds(seed: Optional[int], seeds: Optional[Union[int, list[int], str]]) -> str:
    """The seeds from ``--seed`` or ``--seeds`` (at most one of them; the study's 0-9 if neither is given), as
    ``"0,1,2"``: one string is checked at once by the parser, where a list of 10,000 seeds took a minute."""
    if seed is not None and seeds is not None:
        raise UserError(f"--seed {seed} and --seeds {seeds} both given; use one of them")
    chosen = parse_seeds(seed) if seed is not None else parse_seeds(seeds) if seeds is not None else DEFAULT_SEEDS
    return ",".join(map(str, chosen))


def _user_error_in(exc: BaseException | None) -> UserError | None:
    while exc is not None and not isinstance(exc, UserError):
        exc = exc.__cause__ or exc.__context__
    return exc


class OneLineErrorParser(LightningArgumentParser):
    """Turns a command-line or config error into a UserError (one line, exit 2) instead of usage + message."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse's own trial parses: let it handle them
            return super().error(message, ex)
        cause = _user_error_in(ex)
        if cause is not None:
            raise cause
        raise UserError(" ".join(line.strip() for line in str(message).splitlines() if line.strip()))


class AmaxCLI(LightningCLI):
    """LightningCLI for ActMaxModule: adds ``--seed``/``--seeds``, the study's trainer defaults, input checks."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` only: Lightning's validate, test and predict have nothing to do here."""
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--seed", type=Optional[int], default=None, help="Run one seed, e.g. --seed 3.")
        parser.add_argument(
            "--seeds",
            type=Optional[Union[int, list[int], str]],
            default=None,
            help="Run several seeds as one batch: 0-9, 0,4,7 or [0,4,7]. Default: 0-9.",
        )
        parser.link_arguments(("seed", "seeds"), "model.seeds", compute_fn=choose_seeds)
        parser.add_argument(
            "--threads",
            type=Optional[int],
            default=None,
            help="CPU threads for torch's math (torch.set_num_threads); default: torch's choice. On cores shared "
            "with other jobs, 1 can be several times faster.",
        )
        parser.add_argument(
            "--collective_timeout",
            type=int,
            default=cluster.DEFAULT_COLLECTIVE_TIMEOUT,
            help="Seconds a process waits in a collective (DDP) for the others before it stops with one line naming "
            "the lost process; default 600.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ResultsWriter, "results")
        parser.set_defaults(STUDY_DEFAULTS)

    def parse_arguments(self, parser, args) -> None:
        """Parse as LightningCLI does; check a given checkpoint file first (LightningCLI reads its hparams next)."""
        super().parse_arguments(parser, args)
        ckpt_path = self.config.get(self.config.get("subcommand") or "", {}).get("ckpt_path")
        if ckpt_path not in (None, "last"):
            load_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        threads = DEFAULT_THREADS if config.threads is None else check_int("threads", config.threads, low=1, high=4096)
        torch.set_num_threads(threads)  # also resets what an earlier fit in this process (a study) set
        if config.threads is not None:  # else Lightning's DDP launch sets cores / processes, overriding --threads
            os.environ["OMP_NUM_THREADS"] = str(threads)
        check_int("trainer.max_steps", config.trainer.max_steps, low=1, high=MAX_STEPS)
        if config.trainer.log_every_n_steps is not None:  # None: Lightning's default
            check_int("trainer.log_every_n_steps", config.trainer.log_every_n_steps, low=1, high=MAX_STEPS)
        if config.get("checkpoint") is not None and config.checkpoint.every_n_train_steps is not None:
            check_int("checkpoint.every_n_train_steps", config.checkpoint.every_n_train_steps, low=0, high=MAX_STEPS)
        check_int("collective_timeout", config.collective_timeout, low=1, high=cluster.MAX_COLLECTIVE_TIMEOUT)

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with amax_lightning's default logger (exclusive run folders), a progress bar counting
        steps, and the interrupt handling, which runs after every callback that records the step (a Ctrl-C stops
        the run only once they have)."""
        config = self.config_init.get(self.subcommand, self.config_init).get("trainer") or {}
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = RunLogger(save_dir=root)
        callbacks = list(config.get("callbacks") or [])
        reporter = self.model.reporter()  # the ResultsWriter itself comes from the --results.* options
        if reporter is not ResultsWriter and not any(isinstance(c, reporter) for c in callbacks):
            callbacks.append(reporter())  # the SensitivityRecorder records every step, before an interrupt acts
        if config.get("enable_progress_bar") in (None, True):
            callbacks.append(StepProgressBar() if sys.stdout.isatty() else PlainProgress())
        kwargs["callbacks"] = [*callbacks, DeferInterrupts()]
        kwargs.update(self._launched_trainer(config))
        return super().instantiate_trainer(**kwargs)

    def _launched_trainer(self, config: dict) -> dict:
        """The Trainer's processes as srun / torchrun started them (one-line errors where the flags disagree), and
        under DDP collectives that give up after ``--collective_timeout`` seconds."""
        launch = cluster.detect_launch()
        settings = cluster.matching_trainer(launch, config.get("devices", "auto"), config.get("num_nodes", 1))
        devices = cluster.count_devices(settings.get("devices", config.get("devices", "auto"))) or 1
        processes = launch.world_size if launch else devices
        strategy = config.get("strategy", "auto")
        environment = cluster.cluster_environment(launch)
        timeout = self.config.get(self.subcommand, self.config).collective_timeout
        if strategy == "ddp" or (strategy == "auto" and processes > 1):
            settings["strategy"] = cluster.ddp_strategy(timeout, environment)
        elif environment is not None and isinstance(strategy, str):
            settings["plugins"] = [*(config.get("plugins") or []), environment]
        return settings

    def before_fit(self) -> None:
        self.model.check_trainer(self.trainer)
        if len(self.model.targets) > 1:  # a sweep that cannot fit stops before anything is written
            self.model.check_memory(self.trainer.strategy.root_device)
        writer = find_callback(self.trainer, ResultsWriter)
        if len(self.model.targets) > 1 and writer is not None and writer.uses_baseline:
            raise UserError("the data baseline (--results.baseline_*) works for one target unit, not a sweep")
        if writer is not None:
            writer.check_steps(self.trainer.max_steps)
            writer.check_corpus(self.model, 1, probe=True)  # a window too long, or no text, stops now
        if writer is not None and writer.null_samples and self.model.search is None:  # refused now, not after the steps
            check_null_size(len(self.model.seeds) * self.model.n_tokens)
        vocabulary = self.model.backbone.vocab_embeddings.shape[0]
        if writer is not None and writer.baseline_top_k > vocabulary:
            raise UserError(f"results.baseline_top_k {writer.baseline_top_k} is out of range; this model's "
                            f"vocabulary allows 0..{vocabulary}")
        fit_args = self.config_init[self.subcommand]
        if fit_args.weights_only is None:
            fit_args.weights_only = True  # checkpoints are loaded with torch.load(weights_only=True)
        if fit_args.ckpt_path is None and cluster.requeued() and isinstance(self.trainer.logger, RunLogger) \
                and find_last_checkpoint(self.trainer.logger.root_dir) is not None:
            fit_args.ckpt_path = "last"  # a requeued SLURM job continues where it was stopped
        resume_last = fit_args.ckpt_path == "last"
        if resume_last:
            fit_args.ckpt_path = self._resume_in_place()
        if fit_args.ckpt_path is not None:
            self.model.check_resumable(load_checkpoint(fit_args.ckpt_path))
        if not resume_last and isinstance(self.trainer.logger, RunLogger) and rank_zero_only.rank == 0:
            self.trainer.logger.claim()  # last: nothing is written before every check has passed

    def _resume_in_place(self) -> str:
        """Find the newest ``version_*/checkpoints/last.ckpt`` and continue that run in its own log folder."""
        logger = self.trainer.logger
        if not isinstance(logger, RunLogger):
            raise UserError("--ckpt_path last needs the default TensorBoard logger; pass a checkpoint file instead")
        found = find_last_checkpoint(logger.root_dir)
        if found is None:
            raise UserError(f"--ckpt_path last: no version_*/checkpoints/last.ckpt under {logger.root_dir!r}")
        path, version = found
        logger.resume(version)  # write into the interrupted run's folder, not a new version
        return path

    def after_fit(self) -> None:
        writer = find_callback(self.trainer, ResultsWriter)
        if writer.results_path is not None:
            print(writer.results_path, flush=True)


def load_checkpoint(path: str) -> dict:
    """Load an amax_lightning checkpoint with ``weights_only=True``; a UserError if it is missing or unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"ckpt_path {path!r} is not a file; give a .ckpt file or 'last'")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint {path!r} cannot be read safely (weights_only=True): {first_line(exc)}") from exc
    if not isinstance(checkpoint, dict) or "parameter" not in checkpoint.get("state_dict", {}):
        raise UserError(f"checkpoint {path!r} is not an amax_lightning checkpoint (no parameter in its state_dict)")
    return checkpoint


def run_trainer(args: list[str] | None = None):
    """Run ``fit ...`` in this process and return its Trainer (None when the command did not build one).

    A lost process ends the run with the one line ``DeferInterrupts`` printed, and ``SystemExit(1)``.
    """
    quiet_console()
    sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        cli = AmaxCLI(
            ActMaxModule,
            parser_class=OneLineErrorParser,
            seed_everything_default=False,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites its own config.yaml
            parser_kwargs={"prog": "amax_lightning"},
            args=args,
        )
    except Exception as exc:
        if getattr(exc, "amax_reported", False):
            raise SystemExit(1) from None
        raise
    finally:  # Lightning restores the handlers it saw at fit start, ours included, when a fit fails
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)
    return getattr(cli, "trainer", None)


