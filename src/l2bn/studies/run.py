"""Run a study: its comparison grids (skipping finished runs), a record of the machine, then its page.

``run_study("table1")`` trains every (norm, seed) of each of the study's grids with
:func:`l2bn.train.compare` into ``<root>/<study>/[<grid>/]runs/<norm>-s<seed>/``, appends one line about
the machine and the invocation to ``<root>/<study>/environment.jsonl`` as soon as its first run finishes
(updated as each later run ends, so an invocation that is killed keeps its record: ``status`` stays
``running``), and rebuilds ``<root>/<study>.md`` from the run folders (:func:`l2bn.studies.page.build_page`).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..train.grid import compare
from .catalog import STUDY_JOBS, Study, StudyOverrides, get_study
from .folder import DEFAULT_ROOT, ENVIRONMENT_FILE, InvocationRecord, environment, grid_dir, study_command
from .page import build_index, build_page, check_pages

__all__ = ["StudyResult", "run_study"]


@dataclass
class StudyResult:
    """What :func:`run_study` did: runs trained, skipped, failed or busy, and the page it wrote."""

    study: Study
    page: Path
    trained: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)  # job ids not waited for: the page is not rebuilt yet
    seconds: float = 0.0


def run_study(
    name: str,
    root: str | os.PathLike = DEFAULT_ROOT,
    *,
    jobs: int = STUDY_JOBS,
    data_dir: str | None = None,
    overrides: StudyOverrides | None = None,
    report_only: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    executor: Any = None,
) -> StudyResult:
    """Train (or resume) study ``name`` under ``root`` and rebuild its page; ``report_only`` only rebuilds.

    ``jobs`` runs that many single-thread runs at once (the records do not depend on it); ``overrides`` makes
    a smaller version (fewer epochs, seeds or norms); ``executor`` (:class:`l2bn.train.executors.SubmititExecutor`)
    runs each run as a submitit job, and if it does not wait the page is rebuilt by a later call. Example:
    ``run_study("table1")``, then read ``docs/results/table1.md``. The page and ``<root>/README.md`` are written
    only over files l2bn wrote (checked before any training) unless ``overwrite``.
    """
    study = get_study(name).apply(overrides)
    command = study_command(name, overrides, root=root, data_dir=data_dir)
    result = StudyResult(study, Path(root) / f"{name}.md")
    check_pages(root, name, overwrite=overwrite)
    start = time.perf_counter()
    if not report_only:
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        invocation = InvocationRecord(Path(root) / study.folder / ENVIRONMENT_FILE, environment(command, jobs), start)
        status = "error"
        try:
            for index, grid in enumerate(study.grids):
                config = study.config(grid, data_dir=data_dir, progress=progress)
                done = compare(config, grid.norms, study.seeds, grid_dir(study, index, root), jobs=jobs, log=log,
                               on_run_end=lambda path, how: invocation.update(trained=how == "done"),
                               executor=executor)
                result.trained += done.trained
                result.skipped += done.skipped
                result.failed += done.failed
                result.busy += done.busy
                result.submitted += done.submitted
            status = "submitted" if result.submitted else "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            invocation.update(status=status)
        result.seconds = time.perf_counter() - start
    if result.submitted:
        return result
    build_page(study, root, command, overwrite=overwrite)
    build_index(root, overwrite=overwrite)
    return result
