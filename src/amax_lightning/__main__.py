"""``python -m amax_lightning fit | study | sensitivity ...``: the one entry point; a user mistake is one line and exit code 2."""

from __future__ import annotations

import gc
import sys

from amax_lightning.base.errors import UserError

COMMANDS = {
    "fit": "maximize one unit (or a sweep) from several seeds; decode, count unique tokens, write the report",
    "study": "run every target x variant of a study file as fits and tabulate n_unique against chance",
    "sensitivity": "perturb each seed's start and tell basins, a plateau or chaos apart",
}
HELP = f"""usage: amax_lightning [-h] {{{",".join(COMMANDS)}}} ...

Does activation maximization in a language model find a stable feature, or noise?

commands:
{chr(10).join(f"  {name:<12} {text}" for name, text in COMMANDS.items())}

Run 'python -m amax_lightning <command> --help' for a command's options.
"""
STUDY_HELP = """usage: amax_lightning study --config STUDY_YAML [FIT OPTIONS ...]

Run every target x variant of a study file as one fit each, in this process, then write study.md, study.csv and
report.html into a new studies/version_N. Every fit's options are checked before the first fit runs.

options:
  -h, --help           show this help and exit
  --config STUDY_YAML  the study file (first): fit_config (optional, relative to the file), targets (a list of target
                       specs), variants (a list of mappings of option -> value, e.g. {model.priors: clamp})
  FIT OPTIONS          passed to every fit, e.g. --trainer.max_steps 100 --model.model_name_or_path ./my-gpt2
                       (see 'amax_lightning fit --help'); not --model.target

example: python -m amax_lightning study --config configs/priors_study.yaml
"""
SENSITIVITY_HELP = """usage: amax_lightning sensitivity --config SENSITIVITY_YAML [FIT OPTIONS ...]

Per target: one fit of every seed x perturbation size x replica, snapshots of their tokens, and fits under other
numerics; then a verdict (basins, plateau or chaos) in sensitivity.md, .json, .csv, report.html and plots, written
into a new sensitivity/version_N.

options:
  -h, --help                 show this help and exit
  --config SENSITIVITY_YAML  the config (first): fit_config, targets, seeds, sizes (relative to each start's norm),
                             replicas, snapshots (steps; the last is the budget), numerics (precisions), alone
  FIT OPTIONS                passed to every fit, e.g. --model.model_name_or_path ./my-gpt2 (see 'amax_lightning
                             fit --help'); not the options the config sets

example: python -m amax_lightning sensitivity --config configs/sensitivity.yaml
"""
HELP_FLAGS = ("-h", "--help")


def main(args: list[str] | None = None) -> None:
    """``fit ...`` runs one study (``commands/fit.py``), ``study ...`` a grid of them (``commands/study.py``),
    ``sensitivity ...`` the perturbation study (``commands/sensitivity.py``); ``--help`` at the top or after a command
    prints its help.

    A user mistake prints one line on stderr and exits with code 2; Ctrl-C exits 130 (1 when Lightning
    handled it), SIGTERM 143.
    """
    from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

    argv = sys.argv[1:] if args is None else args
    try:
        command = argv[0] if argv else None
        if command is None or command in HELP_FLAGS:
            print(HELP, end="", file=sys.stdout if command else sys.stderr)
            if command is None:
                raise UserError(f"a command is needed: one of {', '.join(COMMANDS)}")
        elif command not in COMMANDS:
            raise UserError(f"{command!r} is not a command; use one of {', '.join(COMMANDS)} (see --help)")
        elif command == "study":
            from amax_lightning.commands.study import run_study

            print(STUDY_HELP, end="") if any(a in HELP_FLAGS for a in argv[1:]) else run_study(argv[1:])
        elif command == "sensitivity":
            from amax_lightning.commands.sensitivity import run_sensitivity

            print(SENSITIVITY_HELP, end="") if any(a in HELP_FLAGS for a in argv[1:]) else run_sensitivity(argv[1:])
        else:
            from amax_lightning.commands.fit import run

            run(argv)
        release_process_group()
    except (UserError, MisconfigurationException) as exc:
        print(f"amax_lightning: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        sys.exit(143)
    except KeyboardInterrupt:
        print("amax_lightning: interrupted", file=sys.stderr)
        sys.exit(130)


def release_process_group() -> None:
    """Destroy the DDP process group of a finished command, if there is one, while the interpreter is whole.

    Lightning leaves it alive; left to the interpreter's exit, gloo's worker threads are torn down during
    finalization and a process sometimes aborts (``terminate called without an active exception``, exit 134) after
    all its work is done, which a batch system reports as a failed task (seen under ``srun -n 2``).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def command() -> None:
    """``main`` as a short-lived process, with the garbage collector kept off the objects the imports make.

    torch, transformers and Lightning create a few million long-lived objects and no garbage while importing;
    collecting them anyway costs about 0.7 s on 2 cores, and the interpreter's last collection at exit walks
    them all again (about 0.9 s). So the collector is off during the imports, the imported objects are then
    frozen (``gc.freeze``: kept out of every later collection), and everything alive at exit is frozen too.
    Files are all written and closed by then (``main`` has returned or raised). Not for in-process callers,
    which keep their normal collector (``main``).
    """
    gc.disable()
    try:
        import amax_lightning.commands.fit  # noqa: F401  (the heavy imports of every subcommand)
    except KeyboardInterrupt:
        print("amax_lightning: interrupted", file=sys.stderr)
        sys.exit(130)
    gc.freeze()
    gc.enable()
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    command()
