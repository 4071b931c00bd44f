"""``l2bn study NAME``: train (or resume) one of the studies of docs/results/ and rebuild its page
(:func:`l2bn.studies.run_study`)."""
from __future__ import annotations

import argparse
import sys

from ..cli import INTERRUPTED
from ..studies import DEFAULT_ROOT, StudyOverrides, get_study, list_studies, run_study
from ..studies.catalog import STUDY_JOBS
from ._args import positive_int, seed_list, str_list
from ._executor import add_executor_options, executor_from_args, print_submitted

__all__ = ["add_command"]


def run(args: argparse.Namespace) -> int:
    overrides = StudyOverrides(epochs=args.epochs, train_subset=args.train_subset,
                               seeds=tuple(args.seeds) if args.seeds else None,
                               only=tuple(args.only) if args.only else None)
    get_study(args.name).apply(overrides)  # unknown names refused before any work
    try:
        result = run_study(args.name, args.root, jobs=args.jobs, data_dir=args.data_dir,
                           overrides=overrides if overrides != StudyOverrides() else None,
                           report_only=args.report_only, overwrite=args.overwrite, progress=args.progress,
                           executor=None if args.report_only else executor_from_args(args))
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue (finished epochs and runs are kept)",
              file=sys.stderr)
        return INTERRUPTED
    if result.submitted:
        print_submitted(result.submitted, f"run the same command again (or with --report-only) to write {result.page}")
        return 0
    print(f"page: {result.page} ({len(result.trained)} run(s) trained, {len(result.skipped)} skipped, "
          f"{len(result.failed)} failed, {len(result.busy)} busy)")
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``study``."""
    names = list_studies()
    p = subparsers.add_parser(
        "study", help="run one of the paper's studies on Fashion-MNIST and write its page under docs/results/",
        description="Train every run of a study (skipping finished ones, resuming interrupted ones), then "
                    "rebuild docs/results/NAME.md from the run folders: table1 (BN vs L2BN, Table 1), norms "
                    "(the zoo, Tables 3 and 5), placement (Table 4), curves (Figures 1, 6, 7 of table1's runs).")
    p.add_argument("name", choices=names, help="the study")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help=f"results folder (default: {DEFAULT_ROOT})")
    p.add_argument("--report-only", action="store_true", help="rebuild the page from the run folders; train nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace ROOT/NAME.md and ROOT/README.md even when l2bn did not write them")
    p.add_argument("--jobs", type=int, default=STUDY_JOBS,
                   help=f"runs at once, one CPU thread each; the records do not depend on it (default: {STUDY_JOBS})")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the system copy)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    add_executor_options(p)
    m = p.add_argument_group("a smaller version (miniatures, tests): changes the experiment and the page")
    m.add_argument("--epochs", type=positive_int, default=None)
    m.add_argument("--train-subset", type=positive_int, default=None, metavar="N")
    m.add_argument("--seeds", type=seed_list, default=None, help="comma-separated")
    m.add_argument("--only", type=str_list, default=None,
                   help="comma-separated norms (table1, norms, curves) or placements (placement) to keep")
    p.set_defaults(func=run)
