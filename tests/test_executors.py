"""l2bn.train.executors: grids as submitit jobs (submitit's local executor here; Slurm takes the same jobs) — the
records of a sequential grid, a preempted job requeued and resumed, a killed job resubmitted, crashes recorded as
failures, and the compare command's --executor flags."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from l2bn.cli import main  # noqa: E402
from l2bn.train import RunDir, compare  # noqa: E402
from l2bn.train.executors import SubmititExecutor, SubmititOptions  # noqa: E402
from test_compare import base, quiet  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def _jobs_see_this_source(monkeypatch):
    """submitit's local jobs are fresh interpreters: they must import this checkout's l2bn."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))


def local(**kw) -> SubmititExecutor:
    return SubmititExecutor(SubmititOptions(cluster="local", poll_s=0.2, **kw))


def metrics(grid: Path, name: str) -> bytes:
    return (grid / "runs" / name / "metrics.jsonl").read_bytes()


def _epochs(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _task_pid(job_id: str, timeout: float = 60) -> int:
    """The training process of a local job: the child of submitit's controller, whose pid is the job id."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{job_id}/task/{job_id}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} started no task")


def _when_epoch_logged(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while _epochs(path) < 1:
        assert time.time() < deadline, f"no epoch logged in {path}"
        time.sleep(0.1)


def test_submitit_local_grid_gives_the_sequential_records(tmp_path):
    seq = compare(base(), ["bn", "l2bn"], [121], tmp_path / "seq", log=quiet)
    sub = compare(base(), ["bn", "l2bn"], [121], tmp_path / "sub", log=quiet, executor=local())
    assert seq.complete and sub.complete and len(sub.trained) == 2 and not sub.submitted
    for name in ("bn-s121", "l2bn-s121"):
        assert metrics(tmp_path / "seq", name) == metrics(tmp_path / "sub", name)
    assert (tmp_path / "seq" / "results.csv").read_text() == (tmp_path / "sub" / "results.csv").read_text()
    jobs = json.loads((tmp_path / "sub" / "submitit" / "jobs.json").read_text())
    assert sorted(Path(p).name for p in jobs) == ["bn-s121", "l2bn-s121"]
    again = compare(base(), ["bn", "l2bn"], [121], tmp_path / "sub", log=quiet, executor=local())
    assert again.complete and len(again.skipped) == 2 and not again.trained  # finished runs: only the report


@pytest.mark.slow
def test_a_preempted_job_requeues_and_resumes_to_the_same_records(tmp_path):
    """USR2 (Slurm's warning before preemption or the time limit) mid-run: checkpoint(), requeue, resume last.pt."""
    ref = compare(base(epochs=4), ["l2bn"], [121], tmp_path / "ref", log=quiet)
    grid, logged = tmp_path / "sub", []
    worker = threading.Thread(target=lambda: logged.append(
        compare(base(epochs=4), ["l2bn"], [121], grid, log=quiet, executor=local())))
    worker.start()
    _when_epoch_logged(grid / "runs" / "l2bn-s121" / "metrics.jsonl")
    job_id = next(iter(json.loads((grid / "submitit" / "jobs.json").read_text()).values()))
    os.kill(_task_pid(job_id), signal.SIGUSR2)
    worker.join(timeout=300)
    assert ref.complete and logged and logged[0].complete and len(logged[0].trained) == 1
    assert metrics(tmp_path / "ref", "l2bn-s121") == metrics(grid, "l2bn-s121")
    log = "".join(p.read_text() for p in (grid / "submitit").glob(f"{job_id}_*_log.*"))
    assert "Calling checkpoint method" in log and "Requeued job" in log


def test_a_killed_job_resubmitted_resumes_to_the_same_records(tmp_path):
    ref = compare(base(epochs=3), ["bn"], [121], tmp_path / "ref", log=quiet)
    grid = tmp_path / "sub"
    first = compare(base(epochs=3), ["bn"], [121], grid, log=quiet, executor=local(wait=False))
    assert first.submitted and not first.complete and not first.paths
    _when_epoch_logged(grid / "runs" / "bn-s121" / "metrics.jsonl")
    os.kill(_task_pid(first.submitted[0]), signal.SIGKILL)
    while Path(f"/proc/{first.submitted[0]}").exists() and "Z" not in _state(first.submitted[0]):
        time.sleep(0.1)
    assert 1 <= _epochs(grid / "runs" / "bn-s121" / "metrics.jsonl") < 3
    done = compare(base(epochs=3), ["bn"], [121], grid, log=quiet, executor=local())
    assert done.complete and done.trained and not done.failed
    assert metrics(tmp_path / "ref", "bn-s121") == metrics(grid, "bn-s121")


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


@pytest.mark.slow
def test_a_crashed_job_is_recorded_as_that_runs_failure(tmp_path, monkeypatch):
    """A job that dies with an exception (here: an L2BN implementation its environment names but nobody has) is that
    run's failure, skipped until --retry-failed; the other runs and the report go on."""
    grid = tmp_path / "g"
    compare(base(epochs=2), ["bn", "l2bn"], [121], grid, log=quiet, stop_after=1)
    monkeypatch.setenv("L2BN_IMPL", "no-such-impl")  # inherited by the jobs; only L2BN layers read it
    result = compare(base(epochs=2), ["bn", "l2bn"], [121], grid, log=quiet, executor=local())
    assert [f["norm"] for f in result.failed] == ["l2bn"] and result.trained == [grid / "runs" / "bn-s121"]
    assert "crashed" in result.failed[0]["reason"] and "no-such-impl" in result.failed[0]["reason"]
    assert RunDir(grid / "runs" / "l2bn-s121").is_failed() and result.complete
    again = compare(base(epochs=2), ["bn", "l2bn"], [121], grid, log=quiet, executor=local())
    assert len(again.failed) == 1 and len(again.skipped) == 1 and not again.trained  # not retried unless asked


def test_compare_command_submits_without_waiting_and_reports_later(tmp_path, capsys):
    out = tmp_path / "cmp"
    flags = ["compare", "--norms", "bn", "--seeds", "121", "--epochs", "1", "--out", str(out), "--threads", "1",
             "--executor", "submitit", "--cluster", "local", "--logs-dir", str(tmp_path / "logs")]
    assert main(flags + ["--no-wait"]) == 0
    printed = capsys.readouterr().out
    assert "submitted 1 job(s)" in printed and "run the same compare command again" in printed
    job_id = json.loads((tmp_path / "logs" / "jobs.json").read_text())[str(out / "runs" / "bn-s121")]
    assert job_id in printed
    deadline = time.time() + 120
    while not RunDir(out / "runs" / "bn-s121").is_complete():
        assert time.time() < deadline
        time.sleep(0.2)
    assert main(flags + ["--wait"]) == 0
    assert "report:" in capsys.readouterr().out and (out / "results.csv").is_file()


def test_executor_options_are_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match="cpus_per_run must be >= 1, got 0"):
        SubmititOptions(cpus_per_run=0).validate()
    with pytest.raises(ValueError, match="cluster must be slurm, local or None"):
        SubmititExecutor(SubmititOptions(cluster="lsf"))
    assert main(["compare", "--executor", "submitit", "--time-limit", "0", "--out", str(tmp_path / "x")]) == 1
    assert "timeout_min must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
