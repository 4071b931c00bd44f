"""A study's folder under the results root: where its grids train, the command that trains it, and
``environment.jsonl``, one record per invocation of the machine, versions and code that trained its runs —
the studies' counterpart of :class:`l2bn.train.rundir.RunDir`."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
import uuid
from pathlib import Path

import torch

from ..kernels.dispatch import impl_setting
from ..train.rundir import RunFileError, append_line, folder_lock, write_atomic
from .catalog import THREADS_PER_RUN, Study, StudyOverrides

__all__ = ["DEFAULT_ROOT", "ENVIRONMENT_FILE", "InvocationRecord", "code_version", "environment",
           "environment_records", "grid_dir", "study_command"]

DEFAULT_ROOT = Path("docs/results")
ENVIRONMENT_FILE = "environment.jsonl"


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


def environment(command: str, jobs: int) -> dict:
    """A new invocation's record: its id, date, command, machine, versions, implementation and code."""
    return {
        "invocation": uuid.uuid4().hex[:12],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "jobs": jobs, "threads": THREADS_PER_RUN,
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "l2bn_impl": impl_setting(), "isa": instruction_sets(),
        "runs_trained": 0, "wall_seconds": 0.0, "status": "running", "code": code_version(),
    }


def instruction_sets() -> str:
    """What the float sums ran on: torch's CPU capability (its vectorised kernels) and the instruction set the
    compiled L2BN kernel is built for — with the CPU model, what byte-for-byte reproducibility depends on."""
    from ..kernels.cpp import instruction_set

    return f"torch {torch.backends.cpu.get_cpu_capability()}, kernel {instruction_set()}"


# What the page reads of every record (older records may lack ``code`` and ``status``).
RECORD_KEYS = ("date", "command", "cpu", "cores", "threads", "jobs", "torch", "l2bn_impl", "runs_trained",
               "wall_seconds")


class InvocationRecord:
    """This invocation's line of ``environment.jsonl``: written when its first run finishes, then kept current.

    Every write holds a lock on the study's folder, so invocations ending at once neither lose nor tear a line.
    """

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.path.parent):
            if not self.written:
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
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunFileError(f"{path}, line {number}: not a JSON record ({exc.msg}); restore or delete it") from None
        missing = [k for k in RECORD_KEYS if k not in record] if isinstance(record, dict) else list(RECORD_KEYS)
        if missing:
            raise RunFileError(f"{path}, line {number}: not an invocation record (no {', '.join(missing)}: "
                               f"{line[:60]!r}); restore or delete that line")
        records.append(record)
    return records
