"""The comparison grid as a library function: every (norm, seed) of one experiment, then the paper's report.

``compare(config, norms, seeds, out, jobs=1)`` trains each run into ``out/runs/<norm>-s<seed>/`` — skipping
finished runs of the same experiment, resuming interrupted ones, not retrying recorded failures unless
``retry_failed`` — and writes the report (:mod:`l2bn.train.report`) into ``out``. ``jobs > 1`` runs that many runs at
once as separate (spawned) processes with the CPU threads split between them, one progress bar for the grid;
each run's records are the same as in a sequential grid. ``executor=`` (a
:class:`l2bn.train.executors.SubmititExecutor`) runs each run as a submitit job instead (Slurm or local processes).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from . import report
from .config import TrainConfig, stored_identity
from .ddp import check_device
from .engine import NonFiniteLossError, train
from .rundir import CheckpointError, RunBusyError, RunDir

__all__ = ["GridReport", "compare"]


@dataclass
class GridReport:
    """What :func:`compare` did: the runs it trained, skipped, found failed or busy, and the report it wrote."""

    out: Path
    run_dirs: list[Path]
    trained: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # the failure records (norm, seed, epoch, step, reason)
    busy: list[Path] = field(default_factory=list)
    stopped: bool = False  # ``stop_after`` ended the grid early: no report yet
    submitted: list[str] = field(default_factory=list)  # ids of jobs submitted and not waited for: no report yet
    rows: list[dict] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Whether every run finished or failed and the report was written."""
        return bool(self.paths)


def _check_grid(config: TrainConfig, norms: Sequence[str], seeds: Sequence[int], jobs: int) -> None:
    from ..norms import get_norm_layer

    for what, values in (("norms", norms), ("seeds", seeds)):
        if not values:
            raise ValueError(f"{what} must not be empty")
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise ValueError(f"repeated {what}: {', '.join(repeated)}")
    for norm in norms:
        get_norm_layer(norm)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("jobs > 1 runs separate processes; under torchrun use jobs=1 (DDP spreads each run)")
    config.validate()


def _plan(config: TrainConfig, norms: Sequence[str], seeds: Sequence[int], out: Path) -> list[TrainConfig]:
    """One config per (norm, seed); a folder holding another experiment is refused before any work."""
    configs = []
    for norm in norms:
        for seed in seeds:
            run = RunDir(out / "runs" / f"{norm}-s{seed}")
            run_config = dataclasses.replace(config, norm=norm, seed=seed, out=str(run.path))
            try:
                stored = stored_identity(run) if run.holds_run() or run.is_failed() else None
            except CheckpointError:
                stored = None  # an unreadable last.pt fails that run alone (_run_one), not the grid
            if stored is not None and stored != run_config.identity():
                mine = run_config.identity()
                diff = "; ".join(f"{k}: stored {stored[k]!r} vs now {mine[k]!r}" for k in mine if stored[k] != mine[k])
                raise ValueError(f"{run.path} holds another experiment ({diff}); choose another out folder")
            configs.append(run_config)
    return configs


def _run_one(config: TrainConfig, stop_after: int | None, log: Callable[[str], None] | None) -> dict[str, Any]:
    """Train one run; a divergence or a busy folder is an outcome, not an exception."""
    try:
        result = train(config, log=log, stop_after=stop_after)
    except NonFiniteLossError as exc:
        return {"status": "failed", "failure": exc.failure, "message": str(exc)}
    except RunBusyError as exc:
        return {"status": "busy", "message": str(exc)}
    except CheckpointError as exc:  # a corrupt last.pt: this run fails, the grid goes on
        failure = {"norm": config.norm, "seed": config.seed, "epoch": None, "step": None, "reason": str(exc)}
        return {"status": "failed", "failure": failure, "message": str(exc), "unreadable": True}
    return {"status": "stopped" if "stopped_after" in result else "done"}


def compare(
    config: TrainConfig,
    norms: Sequence[str],
    seeds: Sequence[int] | None = None,
    out: str | os.PathLike | None = None,
    *,
    jobs: int = 1,
    retry_failed: bool = False,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
    on_run_end: Callable[[Path, str], None] | None = None,
    executor: Any = None,
) -> GridReport:
    """Train every (norm, seed) of ``config``'s experiment into ``out/runs/`` and write the report into ``out``.

    ``config`` gives everything but the norm and seed (its ``out`` is ignored); ``seeds`` default to the
    recipe's. Returns a :class:`GridReport`; the report is written once every run has finished or failed.
    ``on_run_end(run_folder, status)`` is called as each run ends (status ``done``, ``stopped``, ``failed`` or
    ``busy``), in the order they end. ``executor`` (:class:`~l2bn.train.executors.SubmititExecutor`) submits
    the runs as jobs; if it does not wait, ``submitted`` lists the job ids and the same call later writes the report.
    Example: ``compare(TrainConfig(dataset="digits"), ["bn", "l2bn"], out="runs/cmp", jobs=2)``.
    """
    start = time.perf_counter()
    seeds = list(seeds) if seeds is not None else list(config.recipe.seeds)
    out = Path(out if out is not None else config.out)
    base = dataclasses.replace(config, out=str(out), resume=False)
    _check_grid(base, norms, seeds, jobs)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    configs = _plan(base, norms, seeds, out)
    result = GridReport(out, [Path(c.out) for c in configs])
    pending = _pending(configs, result, retry_failed, log)
    outcomes = _outcomes(pending, jobs, executor, stop_after, out, log, on_run_end, result)
    unreadable = set()
    for run_config, outcome in zip(pending, outcomes):
        status = outcome["status"]
        if status == "failed":
            log(f"run failed: {outcome['message']}")
            result.failed.append(outcome["failure"])
            if outcome.get("unreadable"):
                unreadable.add(Path(run_config.out))
        elif status == "busy":
            log(outcome["message"])
            result.busy.append(Path(run_config.out))
        else:
            result.trained.append(Path(run_config.out))
            result.stopped |= status == "stopped"
    result.seconds = time.perf_counter() - start
    if result.stopped or result.busy or result.submitted or int(os.environ.get("RANK", "0")) != 0:
        return result
    runs = [report.load_run(p) for p in result.run_dirs
            if (RunDir(p).metrics_path.is_file() or RunDir(p).is_failed()) and p not in unreadable]
    result.rows = report.summarize(runs, norms)
    result.paths = report.write_report(runs, out, norms, title=report.grid_title(base, seeds))
    result.seconds = time.perf_counter() - start
    return result


def _pending(configs: Sequence[TrainConfig], result: GridReport, retry_failed: bool,
             log: Callable[[str], None]) -> list[TrainConfig]:
    """The runs still to train (resuming those begun); finished runs of the same experiment and, unless
    ``retry_failed``, recorded failures are logged and noted in ``result`` instead."""
    pending = []
    for run_config in configs:
        run = RunDir(run_config.out)
        if run.is_complete() and stored_identity(run) == run_config.identity():
            log(f"skip {run.path} (complete)")
            result.skipped.append(run.path)
        elif run.is_failed() and not retry_failed:
            failure = run.read_failure()
            log(f"skip {run.path} (failed at epoch {failure.get('epoch')}: {failure.get('reason')}; "
                "retry with --retry-failed)")
            result.failed.append(failure)
        else:
            pending.append(dataclasses.replace(run_config, resume=run.holds_run()))
    return pending


def _outcomes(pending: Sequence[TrainConfig], jobs: int, executor: Any, stop_after: int | None, out: Path,
              log: Callable[[str], None], on_run_end: Callable[[Path, str], None] | None,
              result: GridReport) -> Iterable[dict[str, Any]]:
    """Run ``pending`` sequentially, in a local pool or through ``executor``; the outcomes in ``pending``'s order."""
    notify = on_run_end or (lambda path, status: None)
    on_done = lambda i, outcome: notify(Path(pending[i].out), outcome["status"])  # noqa: E731
    if executor is not None and pending:
        outcomes, result.submitted = executor.run(pending, _run_one, stop_after, out, log, on_done)
        return outcomes
    if jobs > 1:
        return _run_parallel(pending, jobs, stop_after, log, on_done)
    return (_notified(notify, c, _run_one(c, stop_after, log)) for c in pending)  # lazily: reported as each ends


def _notified(notify: Callable[[Path, str], None], config: TrainConfig, outcome: dict[str, Any]) -> dict[str, Any]:
    notify(Path(config.out), outcome["status"])
    return outcome


# ---------------------------------------------------------------------------------------------- parallel
_WORKER: dict[str, Any] = {}


def _init_worker(messages, slots, threads: int) -> None:
    """Per worker process: its log queue, its slot (for one GPU each) and its share of the CPU threads."""
    with slots.get_lock():
        slot = slots.value
        slots.value += 1
    torch.set_num_threads(threads)
    _WORKER.update(messages=messages, slot=slot, threads=threads)


def _worker_run(config: TrainConfig, stop_after: int | None) -> dict[str, Any]:
    count = torch.cuda.device_count() if check_device(config.device).type == "cuda" else 0
    if count > 1 and config.device in ("auto", "cuda"):
        config = dataclasses.replace(config, device=f"cuda:{_WORKER['slot'] % count}")
    config = dataclasses.replace(config, threads=_WORKER["threads"], progress=False)
    return _run_one(config, stop_after, _WORKER["messages"].put)


def _epochs_logged(configs: Sequence[TrainConfig]) -> int:
    total = 0
    for c in configs:
        path = RunDir(c.out).metrics_path
        total += path.read_bytes().count(b"\n") if path.is_file() else 0
    return total


def _run_parallel(configs: Sequence[TrainConfig], jobs: int, stop_after: int | None, log: Callable[[str], None],
                  on_done: Callable[[int, dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Run ``configs`` in ``jobs`` spawned processes; one bar counts the grid's epochs, run logs print above it.

    ``on_done(index, outcome)`` is called in the parent as each run ends.
    """
    import multiprocessing

    if not configs:
        return []
    jobs = min(jobs, len(configs))
    threads = max(1, (configs[0].threads or torch.get_num_threads()) // jobs)
    ctx = multiprocessing.get_context("spawn")
    messages, slots = ctx.Queue(), ctx.Value("i", 0)
    last = configs[0].recipe.epochs if stop_after is None else min(stop_after, configs[0].recipe.epochs)
    done_before = _epochs_logged(configs)
    total = len(configs) * last
    show = sys.stderr.isatty() if configs[0].progress is None else configs[0].progress
    bar = tqdm(total=total, initial=min(done_before, total), unit="epoch", desc=f"grid ({jobs} jobs)",
               file=sys.stderr, disable=not show)

    def drain() -> None:
        while True:
            try:
                message = messages.get_nowait()
            except queue.Empty:
                break
            bar.write(message, file=sys.stderr) if show else log(message)
        bar.n = min(_epochs_logged(configs), total)
        bar.refresh()

    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(messages, slots, threads))
    try:
        futures = [pool.submit(_worker_run, c, stop_after) for c in configs]
        index = {future: i for i, future in enumerate(futures)}
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, timeout=0.5, return_when=FIRST_COMPLETED)
            drain()
            for future in sorted(finished, key=index.get):
                on_done(index[future], future.result())
        pool.shutdown(wait=True)  # the workers exit, flushing what they logged
        drain()
        return [f.result() for f in futures]
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
