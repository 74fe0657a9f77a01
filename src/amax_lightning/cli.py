"""``python -m amax_lightning fit ...``: LightningCLI with the study's defaults and ``--seed`` / ``--seeds``."""

from __future__ import annotations

import glob
import os
import sys
import warnings
from typing import Optional, Union

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from amax_lightning.callbacks import ResultsWriter
from amax_lightning.checks import check_int
from amax_lightning.errors import UserError, first_line
from amax_lightning.module import DEFAULT_SEEDS, ActMaxModule, check_precision, check_world_size
from amax_lightning.report import claim_version_folder
from amax_lightning.seeds import parse_seeds

DEFAULT_THREADS = torch.get_num_threads()  # torch's choice at start-up

STUDY_DEFAULTS = {
    "trainer.max_steps": 500,
    "trainer.log_every_n_steps": 10,
    "checkpoint.every_n_train_steps": 50,  # resumable: last.ckpt every 50 steps, at the end and on interrupt
    "checkpoint.save_last": True,
    "checkpoint.save_top_k": 0,
}


def choose_seeds(seed: Optional[int], seeds: Optional[Union[int, list[int], str]]) -> list[int]:
    """The seed list from ``--seed`` or ``--seeds`` (at most one of them); the study's 0-9 if neither is given."""
    if seed is not None and seeds is not None:
        raise UserError(f"--seed {seed} and --seeds {seeds} both given; use one of them")
    if seed is not None:
        return parse_seeds(seed)
    return parse_seeds(seeds) if seeds is not None else list(DEFAULT_SEEDS)


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
        steps = config.trainer.max_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"trainer.max_steps {steps!r} is out of range; the number of optimizer steps must be >= 1")

    def before_fit(self) -> None:
        check_precision(self.trainer.precision)
        check_world_size(self.model.n_rows, self.trainer.world_size)
        writer = next((cb for cb in self.trainer.callbacks if isinstance(cb, ResultsWriter)), None)
        if len(self.model.targets) > 1 and writer is not None and (writer.baseline_top_k or writer.baseline_text):
            raise UserError("the data baseline (--results.baseline_*) works for one target unit, not a sweep")
        fit_args = self.config_init[self.subcommand]
        if fit_args.weights_only is None:
            fit_args.weights_only = True  # checkpoints are loaded with torch.load(weights_only=True)
        resume_last = fit_args.ckpt_path == "last"
        if resume_last:
            fit_args.ckpt_path = self._resume_in_place()
        if fit_args.ckpt_path is not None:
            self.model.check_resumable(load_checkpoint(fit_args.ckpt_path))
        if not resume_last and isinstance(self.trainer.logger, TensorBoardLogger) and rank_zero_only.rank == 0:
            claim_new_version(self.trainer.logger)  # last: nothing is written before every check has passed

    def _resume_in_place(self) -> str:
        """Find the newest ``version_*/checkpoints/last.ckpt`` and continue that run in its own log folder."""
        logger = self.trainer.logger
        if not isinstance(logger, TensorBoardLogger):
            raise UserError("--ckpt_path last needs the default TensorBoard logger; pass a checkpoint file instead")
        found = find_last_checkpoint(logger.root_dir)
        if found is None:
            raise UserError(f"--ckpt_path last: no version_*/checkpoints/last.ckpt under {logger.root_dir!r}")
        path, version = found
        logger._version = version  # write into the interrupted run's folder, not a new version
        return path

    def after_fit(self) -> None:
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, ResultsWriter))
        if writer.results_path is not None:
            print(writer.results_path, flush=True)


def claim_new_version(logger: TensorBoardLogger) -> None:
    """Create the logger's ``version_N`` folder exclusively, moving to N+1, N+2, ... while another run has it.

    Two runs started at the same moment would otherwise both pick the next free version and write over
    each other's results; ``os.mkdir`` lets exactly one of them have each folder.
    """
    if logger._version is not None:  # a version the user chose (or a resumed run) is used as given
        return
    logger._version = claim_version_folder(logger.root_dir, first=logger.version)


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


def find_last_checkpoint(logs_root: str) -> tuple[str, int] | None:
    """The most recently written ``<logs_root>/version_N/checkpoints/last.ckpt`` and its N, or None."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(logs_root), "version_*", "checkpoints", "last.ckpt")):
        suffix = os.path.basename(os.path.dirname(os.path.dirname(path)))[len("version_") :]
        if suffix.isdigit():
            found.append((os.path.getmtime(path), int(suffix), path))
    if not found:
        return None
    _, version, path = max(found)
    return path, version


def run(args: list[str] | None = None) -> str | None:
    """Run the CLI in this process and return the path of the ``results.json`` it wrote (None if none).

    Raises UserError (and Lightning's MisconfigurationException) for user mistakes.
    """
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen backbone, on purpose
    cli = AmaxCLI(
        ActMaxModule,
        parser_class=OneLineErrorParser,
        seed_everything_default=False,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},  # a resumed run rewrites its own config.yaml
        args=args,
    )
    trainer = getattr(cli, "trainer", None)
    writer = next((cb for cb in trainer.callbacks if isinstance(cb, ResultsWriter)), None) if trainer else None
    return writer.results_path if writer else None


def main(args: list[str] | None = None) -> None:
    """Entry point: ``fit ...`` runs one study, ``study ...`` a grid of them (see ``study.py``).

    A user mistake prints one line on stderr and exits with code 2.
    """
    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["study"]:
            from amax_lightning.study import run_study

            run_study(argv[1:])
        else:
            run(args)
    except (UserError, MisconfigurationException) as exc:
        print(f"amax_lightning: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        sys.exit(143)
    except KeyboardInterrupt:
        print("amax_lightning: interrupted", file=sys.stderr)
        sys.exit(130)
