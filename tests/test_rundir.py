"""RunDir: atomic writes with unique temporaries and fsync, a full disk, torn and edited files, safe checkpoint
loading, the per-folder lock."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from l2bn.train import rundir
from l2bn.train.rundir import CheckpointError, DiskFullError, RunBusyError, RunDir, RunFileError


def _checkpoint(epoch=1):
    return {"model": {"w": torch.ones(2)}, "epoch": epoch, "best_acc": 50.0, "best_epoch": epoch,
            "config": {"norm": "bn", "seed": 1}, "num_classes": 10, "in_channels": 1}


def test_atomic_writes_use_unique_fsynced_temporaries(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    replaced, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(rundir.os, "replace", lambda a, b: (replaced.append(Path(a)), real_replace(a, b))[1])
    monkeypatch.setattr(rundir.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    run.save_checkpoint(_checkpoint(1))
    run.save_checkpoint(_checkpoint(2))
    run.write_summary({"best_test_acc": 1.0})
    assert len(set(replaced)) == 3 and all(p.parent == tmp_path and p.name.endswith(".tmp") for p in replaced)
    assert len(synced) >= 6  # each file and the folder after each rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "summary.json"]
    assert RunDir.load_checkpoint(run.last_path)["epoch"] == 2
    plain = tmp_path / "plain"
    plain.write_text("")
    assert run.last_path.stat().st_mode == run.summary_path.stat().st_mode == plain.stat().st_mode  # not 0600
    plain.unlink()


def _full_disk_after(monkeypatch, good_calls: int, partial: bool = True):
    """Make the run-folder writer fail with ENOSPC after ``good_calls`` complete writes (half a write first)."""
    real = rundir._write_fully
    calls = {"n": 0}

    def writer(fd, data):
        calls["n"] += 1
        if calls["n"] > good_calls:
            if partial:
                os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(rundir, "_write_fully", writer)


def test_disk_full_on_a_checkpoint_keeps_the_last_good_one_and_no_temporary(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.save_checkpoint(_checkpoint(1))
    before = run.last_path.read_bytes()
    _full_disk_after(monkeypatch, 0)
    with pytest.raises(DiskFullError, match=f"^no space left on device: {tmp_path}$") as err:
        run.save_checkpoint(_checkpoint(2))
    assert err.value.errno == errno.ENOSPC
    assert run.last_path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_disk_full_on_a_log_line_appends_nothing(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.append_record({"epoch": 1, "test_acc": 10.0})
    before = run.metrics_path.read_bytes()
    _full_disk_after(monkeypatch, 0)
    with pytest.raises(DiskFullError, match="no space left on device"):
        run.append_record({"epoch": 2, "test_acc": 20.0})
    assert run.metrics_path.read_bytes() == before  # the half-written line was cut back
    assert [r["epoch"] for r in run.read_records()] == [1]


def test_torn_and_edited_logs_name_the_file_and_line(tmp_path):
    run = RunDir(tmp_path)
    lines = [json.dumps({"epoch": e, "test_acc": 1.0}) for e in (1, 2, 3)]
    run.metrics_path.write_text(lines[0] + "\n" + lines[1][:9] + "\n" + lines[2] + "\n")
    with pytest.raises(RunFileError, match=rf"{run.metrics_path}, line 2: not a JSON record"):
        run.read_records()
    run.metrics_path.write_text(lines[0] + "\n" + lines[2] + "\n")
    with pytest.raises(RunFileError, match=r"line 2: epoch 3 where epoch 2 was expected"):
        run.read_records()
    run.metrics_path.write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(RunFileError, match=r"line 2: epoch 1 where epoch 2 was expected"):
        run.read_records()
    # a crash mid-append leaves an unterminated last line: reading refuses it, resuming drops it
    run.metrics_path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:7])
    with pytest.raises(RunFileError, match="line 3"):
        run.read_records()
    run.keep_epochs(2)
    assert run.metrics_path.read_text() == lines[0] + "\n" + lines[1] + "\n"


def test_torn_summary_names_the_file(tmp_path):
    run = RunDir(tmp_path)
    run.summary_path.write_text('{"best_test_acc": 9')
    with pytest.raises(RunFileError, match=rf"{run.summary_path} is not valid JSON \(line 1"):
        run.read_summary()
    run.summary_path.write_text('{"best_test_acc": "high"}')
    with pytest.raises(RunFileError, match="no numeric 'best_test_acc'"):
        run.read_summary()


class _Payload:
    """Unpickling this runs code (touches a file): what a crafted checkpoint does under weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "bare_state_dict", "crafted", "other_dict"])
def test_foreign_files_are_refused_without_running_them(tmp_path, kind):
    path, marker = tmp_path / "x.pt", tmp_path / "pwned"
    good = tmp_path / "good.pt"
    torch.save(_checkpoint(), good)
    content = {
        "empty": b"",
        "truncated": good.read_bytes()[:100],
        "random": os.urandom(4096),
    }
    if kind in content:
        path.write_bytes(content[kind])
    elif kind == "bare_state_dict":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif kind == "crafted":
        torch.save({"model": _Payload(marker)}, path)
    else:
        torch.save({"epoch": 3, "model": {}}, path)
    with pytest.raises(CheckpointError, match=rf"^{path} is not .*l2bn .*checkpoint.*last\.pt or best\.pt"):
        RunDir.load_checkpoint(path)
    assert not marker.exists()


def test_resume_needs_the_optimizer_state(tmp_path):
    path = tmp_path / "best.pt"
    torch.save(_checkpoint(), path)
    assert RunDir.load_checkpoint(path)["epoch"] == 1
    with pytest.raises(CheckpointError, match="not an l2bn resume checkpoint.*optimizer"):
        RunDir.load_checkpoint(path, for_resume=True)


def test_one_process_at_a_time_per_run_folder(tmp_path):
    run = RunDir(tmp_path)
    with run.lock():
        with pytest.raises(RunBusyError, match=f"{tmp_path} is being trained by another process"):
            with RunDir(tmp_path).lock():
                pass
    with run.lock():  # released
        pass
    assert list(tmp_path.iterdir()) == []  # no lock file left behind
