"""Grids beyond one machine: each (norm, seed) run as one ``submitit`` job (Slurm, or submitit's local executor).

:class:`SubmititExecutor` is what :func:`l2bn.train.compare` takes as ``executor=``. Each run becomes a
:class:`RunJob` — a ``submitit.helpers.Checkpointable``, so a job that Slurm preempts or times out is requeued and
resumes from its ``last.pt`` — submitted as one job array. With ``wait`` the submitting process collects the
outcomes (a crashed job is recorded as that run's failure); without, it returns the job ids and the report is
written later by the same command. Needs ``pip install "l2bn[slurm]"`` (the commands import this module only
for ``--executor submitit``).
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit

from .config import TrainConfig
from .rundir import RunDir, write_atomic

__all__ = ["RunJob", "SubmititExecutor", "SubmititOptions"]

JOBS_FILE = "jobs.json"  # in the logs folder: run folder -> the id of the job last submitted for it
_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
RunOne = Callable[[TrainConfig, "int | None", Callable[[str], None]], dict[str, Any]]


@dataclass
class SubmititOptions:
    """What one job asks for; ``cluster`` None means Slurm where ``sbatch`` is found, else local processes."""

    cluster: str | None = None  # None, "slurm" or "local"
    folder: str | None = None  # job logs and pickles; None: <grid folder>/submitit
    partition: str | None = None
    timeout_min: int = 24 * 60
    gpus_per_run: int = 0
    cpus_per_run: int = 1
    mem_gb: float | None = None
    array_parallelism: int = 64
    wait: bool = True
    poll_s: float = 1.0

    def validate(self) -> None:
        if self.cluster not in (None, "slurm", "local"):
            raise ValueError(f"cluster must be slurm, local or None (auto), got {self.cluster!r}")
        for name in ("timeout_min", "cpus_per_run", "array_parallelism"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_run < 0 or (self.mem_gb is not None and self.mem_gb <= 0):
            raise ValueError(f"gpus_per_run must be >= 0 and mem_gb > 0, got {self.gpus_per_run} and {self.mem_gb}")


class RunJob(submitit.helpers.Checkpointable):
    """One run as a submitit job: trains (resuming whatever ``last.pt`` holds) and returns the grid's outcome."""

    def __init__(self, run_one: RunOne, config: TrainConfig, stop_after: int | None) -> None:
        self.run_one, self.config, self.stop_after = run_one, config, stop_after

    def __call__(self) -> dict[str, Any]:
        config = dataclasses.replace(self.config, resume=RunDir(self.config.out).holds_run(), progress=False)
        return self.run_one(config, self.stop_after, lambda msg: print(msg, flush=True))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit when Slurm preempts or times out the job: requeue it; the rerun resumes from last.pt
        (the interrupted epoch is trained again, so the records are those of an uninterrupted run)."""
        return submitit.helpers.DelayedSubmission(self)


class SubmititExecutor:
    """Runs a grid's pending runs as one submitit job array; see :class:`SubmititOptions`."""

    def __init__(self, options: SubmititOptions | None = None) -> None:
        self.options = options or SubmititOptions()
        self.options.validate()

    def folder(self, grid: Path) -> Path:
        return Path(self.options.folder) if self.options.folder else grid / "submitit"

    def _executor(self, folder: Path) -> Any:
        o = self.options
        executor = submitit.AutoExecutor(folder=folder, cluster=o.cluster)
        executor.update_parameters(
            name="l2bn", timeout_min=o.timeout_min, nodes=1, tasks_per_node=1, cpus_per_task=o.cpus_per_run,
            gpus_per_node=o.gpus_per_run, slurm_array_parallelism=o.array_parallelism,
            **({"mem_gb": o.mem_gb} if o.mem_gb else {}), **({"slurm_partition": o.partition} if o.partition else {}))
        return executor

    def run(self, configs: Sequence[TrainConfig], run_one: RunOne, stop_after: int | None, grid: Path,
            log: Callable[[str], None], on_done: Callable[[int, dict[str, Any]], None]) -> tuple[list, list[str]]:
        """Submit every run not already queued or running; with ``wait``, return their outcomes (in order) once
        all have ended and no job ids, else no outcomes and the ids of the jobs submitted."""
        folder = self.folder(grid)
        known = _read_jobs(folder)
        active = {c.out: known[c.out] for c in configs if c.out in known and self._active(folder, known[c.out])}
        todo = [c for c in configs if c.out not in active]
        executor = self._executor(folder)
        with executor.batch():
            jobs = [executor.submit(RunJob(run_one, c, stop_after)) for c in todo]
        known.update({c.out: job.job_id for c, job in zip(todo, jobs)})
        write_atomic(folder / JOBS_FILE, json.dumps(known, indent=2).encode())
        for c, job in zip(todo, jobs):
            log(f"submitted {c.out} as job {job.job_id} ({executor.cluster}; logs in {folder})")
        for out, job_id in active.items():
            log(f"{out} is still queued or running as job {job_id}; not submitted again")
        if not self.options.wait:
            return [], [job.job_id for job in jobs]
        outcomes = {c.out: {"status": "busy", "message": f"{c.out} is job {active[c.out]}"} for c in configs
                    if c.out in active}
        outcomes.update(self._wait(todo, jobs, configs, on_done, log))
        return [outcomes[c.out] for c in configs], []

    def _active(self, folder: Path, job_id: str) -> bool:
        if self._executor(folder).cluster != "slurm":
            return False  # local jobs die with their submitter; a live one is caught by the run folder's lock
        return submitit.SlurmJob(folder, job_id).state.split(" ")[0] in _ACTIVE

    def _wait(self, todo: Sequence[TrainConfig], jobs: Sequence[Any], configs: Sequence[TrainConfig],
              on_done: Callable[[int, dict[str, Any]], None], log: Callable[[str], None]) -> dict[str, dict]:
        outcomes: dict[str, dict] = {}
        index = {c.out: i for i, c in enumerate(configs)}
        while len(outcomes) < len(todo):
            for config, job in zip(todo, jobs):
                if config.out in outcomes or not job.done():
                    continue
                outcomes[config.out] = _outcome(config, job, log)
                on_done(index[config.out], outcomes[config.out])
            time.sleep(self.options.poll_s if len(outcomes) < len(todo) else 0)
        return outcomes


def _outcome(config: TrainConfig, job: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """The job's own outcome, or — if it crashed — a failure recorded in its run folder like a divergence."""
    try:
        return job.result()
    except Exception as exc:  # submitit's FailedJobError / UncompletedJobError carry the job's traceback
        blocks = re.split(r"\n-{5,}\n", str(exc))  # submitit: header, the job's traceback, where the logs are
        trace = blocks[1] if len(blocks) > 2 else str(exc)
        last = [line for line in trace.strip().splitlines() if line.strip()][-1:] or [type(exc).__name__]
        run = RunDir(config.out)
        epochs = len(run.read_records()) if run.metrics_path.is_file() else 0
        failure = {"norm": config.norm, "seed": config.seed, "epoch": epochs + 1, "step": None,
                   "reason": f"job {job.job_id} crashed: {last[0].strip()} (log: {job.paths.stderr})"}
        if run.holds_run():  # recorded like a divergence: skipped until --retry-failed, which resumes last.pt
            run.record_failure(failure)
        log(f"job {job.job_id} for {config.out} crashed; its log: {job.paths.stderr}")
        return {"status": "failed", "failure": failure, "message": failure["reason"]}


def _read_jobs(folder: Path) -> dict[str, str]:
    path = folder / JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
