"""Command line: ``python -m l2bn <command>`` (also installed as ``l2bn``).

The commands live in :mod:`l2bn.commands`, one module a subsystem. This module registers them and is the
one place that turns an expected error — a bad value, missing data, an unreadable or foreign file, a full
disk, a diverged run — into a one-line ``error: …`` on stderr and exit code 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .commands import COMMAND_MODULES
from .data import DataError
from .train.engine import NonFiniteLossError
from .train.rundir import RunBusyError

# What a user can cause and fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, DataError, NonFiniteLossError, RunBusyError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2bn",
        description="L2BN: batch normalization on l2-equalised features — layers, metrics and experiments.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except EXPECTED_ERRORS as exc:
        print(f"error: {' '.join(str(exc).split()) if isinstance(exc, OSError) else exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
