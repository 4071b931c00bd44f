"""Command line: ``python -m l2bn <command>`` (also installed as ``l2bn``; both enter through :func:`run`).

The commands live in :mod:`l2bn.commands`, one module a subsystem. This module registers them and is the
one place that turns an expected error — a bad value, missing data, an unreadable or foreign file, a full
disk, a diverged run, a package of an extra not installed — into a one-line ``error: …`` on stderr and exit
code 1. It imports the commands (the experiment side) only when run, so a core install can import it.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

INTERRUPTED = 130  # what a command returns after a Ctrl-C (its message printed): 128 + SIGINT, a shell's status

# The extra that installs each optional package, by top-level import name (pyproject.toml's extras).
EXTRA_OF_PACKAGE = {
    "torchvision": "experiments", "sklearn": "experiments", "matplotlib": "experiments", "scipy": "experiments",
    "tqdm": "experiments", "soundfile": "audio", "librosa": "audio", "threadpoolctl": "audio",
    "tensorboard": "tensorboard", "timm": "timm", "submitit": "slurm",
}


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix; anything else is a bug and keeps its traceback."""
    from .data import DataError
    from .train.engine import NonFiniteLossError
    from .train.rundir import RunBusyError

    return ValueError, OSError, DataError, NonFiniteLossError, RunBusyError


def missing_extra(exc: ImportError) -> str | None:
    """The one-line advice for a package of an extra that is not installed (None for any other import error)."""
    package = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_PACKAGE.get(package)
    if extra is None:
        return None
    return f'this command needs {package}, which is not installed: pip install "l2bn[{extra}]"'


def build_parser() -> argparse.ArgumentParser:
    from .commands import COMMAND_MODULES

    parser = argparse.ArgumentParser(
        prog="l2bn",
        description="L2BN: batch normalization on l2-equalised features — layers, metrics and experiments.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.add_command(subparsers)
    return parser


def run() -> None:
    """The process's entry: exits with :func:`main`'s status, except after a Ctrl-C, where it ends as Python ends
    on an uncaught one — by SIGINT, after the interpreter's clean-up (CPython's ``exit_sigint``) — so that a
    calling shell stops its loop too (a shell goes on after a child that exited 130: it handled the signal) and
    the status does not depend on where the interrupt landed (one inside an ``exec()`` of a string, as in a
    namedtuple's creation, makes ``python -m`` end by SIGINT regardless)."""
    status = main()
    if status != INTERRUPTED:
        raise SystemExit(status)
    sys.excepthook = _quiet_on_interrupt  # the command said how to continue: no traceback
    raise KeyboardInterrupt


def _quiet_on_interrupt(kind: type[BaseException], value: BaseException, traceback: object) -> None:
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv`` as after ``l2bn``; None: ``sys.argv``) and return its exit status: 0, 1 for an
    expected error (printed as one line), :data:`INTERRUPTED` after a Ctrl-C."""
    try:
        return _run(argv)
    except ImportError as exc:
        advice = missing_extra(exc)
        if advice is None:
            raise
        print(f"error: {advice}", file=sys.stderr)
        return 1


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except expected_errors() as exc:
        print(f"error: {' '.join(str(exc).split()) if isinstance(exc, OSError) else exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
