"""The ``--executor`` flags of ``compare`` and ``study``: local processes, or one submitit job per run (Slurm)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_executor_options", "executor_from_args", "print_submitted"]


def add_executor_options(p: argparse.ArgumentParser) -> None:
    """Register the executor group on ``p``."""
    g = p.add_argument_group("executor (a grid beyond one machine; docs/distributed.md)")
    g.add_argument("--executor", choices=("local", "submitit"), default="local",
                   help="local: processes on this machine (--jobs); submitit: each (norm, seed) run one job "
                   "through submitit (Slurm where sbatch is found, else local processes); pip install 'l2bn[slurm]'")
    g.add_argument("--cluster", choices=("slurm", "local"), default=None,
                   help="force submitit's Slurm or local executor (default: Slurm where present)")
    g.add_argument("--partition", default=None, help="Slurm partition")
    g.add_argument("--time-limit", type=int, default=24 * 60, metavar="MINUTES",
                   help="per job; a job that times out or is preempted requeues and resumes from last.pt "
                   "(default: 1440)")
    g.add_argument("--gpus-per-run", type=int, default=0, help="GPUs of one job (default: 0)")
    g.add_argument("--cpus-per-run", type=int, default=1, help="CPUs of one job (default: 1)")
    g.add_argument("--mem-gb", type=float, default=None, help="memory of one job (default: the partition's)")
    g.add_argument("--array-parallelism", type=int, default=64, help="jobs of the array running at once (default: 64)")
    g.add_argument("--logs-dir", default=None, help="job logs and pickles (default: the grid folder's submitit/)")
    g.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                   help="wait for the jobs and write the report (default: when stdout is a terminal); without, "
                   "print the job ids and rerun the same command later for the report")


def executor_from_args(args: argparse.Namespace) -> Any:
    """``None`` for ``--executor local``, else a :class:`~l2bn.train.executors.SubmititExecutor`."""
    if args.executor == "local":
        return None
    try:
        from ..train.executors import SubmititExecutor, SubmititOptions
    except ImportError:
        raise SystemExit('error: --executor submitit needs submitit: pip install "l2bn[slurm]"') from None
    wait = sys.stdout.isatty() if args.wait is None else args.wait
    return SubmititExecutor(SubmititOptions(  # a bad value raises ValueError, which the CLI prints in one line
        cluster=args.cluster, folder=args.logs_dir, partition=args.partition, timeout_min=args.time_limit,
        gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run, mem_gb=args.mem_gb,
        array_parallelism=args.array_parallelism, wait=wait, poll_s=5.0))


def print_submitted(job_ids: list[str], again: str) -> None:
    """What to do after submitting without waiting."""
    print(f"submitted {len(job_ids)} job(s): {', '.join(job_ids)}; when they have finished, {again} "
          "(finished runs are skipped)")
