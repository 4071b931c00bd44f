"""Run a study: its comparison grids (skipping finished runs), a record of the machine, then its page.

``run_study("table1")`` trains every (norm, seed) of each of the study's grids with
:func:`l2bn.train.compare` into ``<root>/<study>/[<grid>/]runs/<norm>-s<seed>/``, appends one line about
the machine and the invocation to ``<root>/<study>/environment.jsonl`` as soon as its first run finishes
(updated as each later run ends, so an invocation that is killed keeps its record: ``status`` stays
``running``), and rebuilds ``<root>/<study>.md`` from the run folders (:func:`l2bn.studies.page.build_page`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..train.grid import compare
from ..train.rundir import RunFileError, append_line, write_atomic
from .catalog import STUDY_JOBS, THREADS_PER_RUN, Study, StudyOverrides, get_study

__all__ = ["DEFAULT_ROOT", "StudyResult", "environment_records", "grid_dir", "run_study", "study_command"]

DEFAULT_ROOT = Path("docs/results")
ENVIRONMENT_FILE = "environment.jsonl"


@dataclass
class StudyResult:
    """What :func:`run_study` did: runs trained, skipped, failed or busy, and the page it wrote."""

    study: Study
    page: Path
    trained: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def grid_dir(study: Study, grid_index: int, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """The folder one grid of ``study`` trains into (its ``runs/`` and its own report)."""
    return Path(root) / study.folder / study.grids[grid_index].folder


def study_command(name: str, overrides: StudyOverrides | None = None, *, root: str | os.PathLike = DEFAULT_ROOT,
                  data_dir: str | None = None) -> str:
    """The command line that trains (or resumes) study ``name`` with ``overrides`` — what the page prints."""
    parts = ["python", "-m", "l2bn", "study", name]
    if Path(root) != DEFAULT_ROOT:
        parts += ["--root", str(root)]
    if data_dir is not None:
        parts += ["--data-dir", str(data_dir)]
    return " ".join(parts + (overrides.flags() if overrides else []))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> str:
    """The code that trains: the git commit of the checkout l2bn runs from, with ``+changes`` when its ``src/``
    differs from that commit; the package version when it is not a git checkout."""
    from .. import __version__

    root = Path(__file__).resolve().parents[3]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return f"l2bn {__version__}"
    return commit + ("+changes" if changed else "")


def _environment(command: str, jobs: int) -> dict:
    from ..functional import IMPL_ENV_VAR

    return {
        "invocation": uuid.uuid4().hex[:12],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "jobs": jobs, "threads": THREADS_PER_RUN,
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "l2bn_impl": os.environ.get(IMPL_ENV_VAR) or "auto",
        "runs_trained": 0, "wall_seconds": 0.0, "status": "running", "code": code_version(),
    }


class _InvocationRecord:
    """This invocation's line of ``environment.jsonl``: written when its first run finishes, then kept current."""

    def __init__(self, path: Path, record: dict, start: float) -> None:
        self.path, self.record, self.start = path, record, start
        self.written = False

    def update(self, *, trained: int = 0, status: str | None = None) -> None:
        self.record["runs_trained"] += trained
        self.record["wall_seconds"] = round(time.perf_counter() - self.start, 1)
        if status is not None:
            self.record["status"] = status
        if not self.record["runs_trained"]:
            return
        if not self.written:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.path, self.record)
            self.written = True
            return
        lines = self.path.read_text().splitlines()
        key = f'"invocation": "{self.record["invocation"]}"'
        lines = [json.dumps(self.record) if key in line else line for line in lines]
        write_atomic(self.path, ("\n".join(lines) + "\n").encode())


def environment_records(study: Study, root: str | os.PathLike = DEFAULT_ROOT) -> list[dict]:
    """Every invocation that trained runs of ``study`` (oldest first): date, machine, versions, wall time."""
    path = Path(root) / study.folder / ENVIRONMENT_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError as exc:
            raise RunFileError(f"{path}, line {number}: not a JSON record ({exc.msg}); restore or delete it") from None
    return records


def run_study(
    name: str,
    root: str | os.PathLike = DEFAULT_ROOT,
    *,
    jobs: int = STUDY_JOBS,
    data_dir: str | None = None,
    overrides: StudyOverrides | None = None,
    report_only: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> StudyResult:
    """Train (or resume) study ``name`` under ``root`` and rebuild its page; ``report_only`` only rebuilds.

    ``jobs`` runs that many single-thread runs at once (the records do not depend on it); ``overrides`` makes
    a smaller version (fewer epochs, seeds or norms). Example: ``run_study("table1")``, then read
    ``docs/results/table1.md``.
    """
    from .page import build_index, build_page

    study = get_study(name).apply(overrides)
    command = study_command(name, overrides, root=root, data_dir=data_dir)
    result = StudyResult(study, Path(root) / f"{name}.md")
    start = time.perf_counter()
    if not report_only:
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        invocation = _InvocationRecord(Path(root) / study.folder / ENVIRONMENT_FILE, _environment(command, jobs), start)
        status = "error"
        try:
            for index, grid in enumerate(study.grids):
                config = study.config(grid, data_dir=data_dir, progress=progress)
                done = compare(config, grid.norms, study.seeds, grid_dir(study, index, root), jobs=jobs, log=log,
                               on_run_end=lambda path, how: invocation.update(trained=how == "done"))
                result.trained += done.trained
                result.skipped += done.skipped
                result.failed += done.failed
                result.busy += done.busy
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            invocation.update(status=status)
        result.seconds = time.perf_counter() - start
    build_page(study, root, command)
    build_index(root)
    return result
