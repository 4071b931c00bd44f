"""Command line: ``python -m l2bn <command>`` (also installed as ``l2bn``)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .bench import add_bench_command
from .geometry import add_geometry_command
from .models.command import add_models_command
from .train.cli import add_analyze_command, add_compare_command, add_train_command

# Each command module contributes one ``add_*_command(subparsers)``; add new ones to this tuple.
COMMANDS = (add_bench_command, add_geometry_command, add_train_command, add_compare_command, add_analyze_command,
            add_models_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2bn",
        description="L2BN: batch normalization on l2-equalised features — layers, metrics and experiments.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
