"""The command line's commands, one module a subsystem, each a thin adapter over the library.

Every module has ``add_command(subparsers)``, which registers its sub-command(s) with a ``func(args) -> int``.
Expected errors (bad values, missing data, unreadable files) are raised, not printed: ``l2bn.cli.main`` is
the one place that turns them into a one-line ``error: …`` and exit code 1.
"""
from . import bench, geometry, models, study, train

# Registration order is the order of ``l2bn --help``; add new command modules here.
COMMAND_MODULES = (bench, geometry, train, models, study)

__all__ = ["COMMAND_MODULES"]
