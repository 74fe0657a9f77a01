"""``python -m amax_lightning fit | study | sensitivity ...``: the one entry point; a user mistake is one line and exit code 2."""

from __future__ import annotations

import gc
import sys

from amax_lightning.errors import UserError


def main(args: list[str] | None = None) -> None:
    """``fit ...`` runs one study (``cli.py``), ``study ...`` a grid of them (``study.py``), ``sensitivity ...``
    the perturbation study (``sensitivity_study.py``).

    A user mistake prints one line on stderr and exits with code 2; Ctrl-C exits 130 (1 when Lightning
    handled it), SIGTERM 143.
    """
    from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["study"]:
            from amax_lightning.study import run_study

            run_study(argv[1:])
        elif argv[:1] == ["sensitivity"]:
            from amax_lightning.sensitivity_study import run_sensitivity

            run_sensitivity(argv[1:])
        else:
            from amax_lightning.cli import run

            run(args)  # None: LightningCLI reads sys.argv itself
    except (UserError, MisconfigurationException) as exc:
        print(f"amax_lightning: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        sys.exit(143)
    except KeyboardInterrupt:
        print("amax_lightning: interrupted", file=sys.stderr)
        sys.exit(130)


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
        import amax_lightning.cli  # noqa: F401  (the heavy imports of every subcommand)
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
