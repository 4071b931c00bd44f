"""One run folder and every file in it: the only place that spells a run file's name or format.

A run folder holds ``config.json`` (what was asked), ``metrics.jsonl`` (one record per epoch, keys
:data:`EPOCH_KEYS`, when measured :data:`ANGLE_KEYS`, and :data:`DEVICE_KEYS` for test sets with devices),
``timing.jsonl``, ``last.pt`` / ``best.pt`` (checkpoints), ``summary.json`` when finished and ``failed.json``
when the run diverged.

Writes are crash- and fault-safe: whole files go to a uniquely named temporary file in the same folder,
are fsync'ed and renamed over the target; log lines are appended whole or not at all; a full disk raises
:class:`DiskFullError` ("no space left on device: DIR") and leaves no temporary file. A folder is trained
by one process at a time (:meth:`RunDir.lock`). Checkpoints load with ``torch.load(weights_only=True)``:
ours hold only tensors, numbers, strings, lists and dicts, so nothing else is allowed to unpickle.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from ..folder_lock import folder_lock

__all__ = [
    "ANGLE_KEYS",
    "ANGLE_TITLES",
    "DEVICE_KEYS",
    "EXTRA_KEYS",
    "EPOCH_KEYS",
    "NORM_STATE_KEYS",
    "CheckpointError",
    "DiskFullError",
    "folder_lock",
    "RunBusyError",
    "RunDir",
    "RunFileError",
    "VAL_KEYS",
]

# The per-epoch record: always these keys, plus ANGLE_KEYS at the epochs that measure the angle metrics.
EPOCH_KEYS: tuple[str, ...] = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")
ANGLE_KEYS: tuple[str, ...] = ("intra_train", "intra_test", "inter", "iir_train", "iir_test")
# Per-epoch state of gated norms, present for models that have them (UBN: mean moving condensation of its
# layers and the fraction of layers whose gate has frozen their statistics; l2bn.norms.unified).
NORM_STATE_KEYS: tuple[str, ...] = ("ubn_condensation", "ubn_gated")
# Per-device confusion, present when the test set records a device per clip (tau2020; l2bn.train.confusion).
DEVICE_KEYS: tuple[str, ...] = ("test_confusion",)
# Present when a run holds out a validation split (l2bn.data.training_split): its loss and accuracy.
VAL_KEYS: tuple[str, ...] = ("val_loss", "val_acc")
# Beside the angle metrics: the cone angle of train and test features (l2bn.metrics) and the test accuracy of
# every class (a list, class order), then the norm spread where the recipe asks for it (l2bn.norm_spread).
# ``train_eval_acc``: accuracy of the model in evaluation mode on the (un-augmented) training images of the
# angle pass — whether the network fits its training data.
EXTRA_KEYS: tuple[str, ...] = ("cone_train", "cone_test", "train_eval_acc", "test_class_acc", "norm_cv")
ANGLE_TITLES: dict[str, str] = {
    "intra_train": "Intra(train)", "intra_test": "Intra(test)", "inter": "Inter",
    "iir_train": "IIR train", "iir_test": "IIR test",
}
# What every checkpoint of ours holds (last.pt adds optimizer, scheduler and scaler states).
CHECKPOINT_KEYS = ("model", "epoch", "best_acc", "best_epoch", "config", "num_classes", "in_channels")
RESUME_KEYS = ("optimizer", "scheduler", "scaler")


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the folder."""


class RunBusyError(RuntimeError):
    """Another process is training this run folder."""


class RunFileError(ValueError):
    """A run file is torn, edited or inconsistent; the message names the file (and line)."""


class CheckpointError(ValueError):
    """A file is not one of our checkpoints (or not a complete one); the message names it and what to do."""


def _write_fully(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (the one place bytes reach a run folder)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(exc: OSError, folder: Path) -> OSError:
    if exc.errno != errno.ENOSPC:
        return exc
    full = DiskFullError(f"no space left on device: {folder}")
    full.errno = errno.ENOSPC
    return full


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's temporaries are 0600


def check_out_dir(out: str | os.PathLike) -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be written — before any work."""
    path = Path(out).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is" if existing == path else f"lies under {existing}, which is"
        raise ValueError(f"--out {out} {where} a file; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is read-only; pass a writable folder")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique temporary file: fsync, rename, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)
            _write_fully(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _disk_full(exc, path.parent) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line whole, or nothing (a failed write is cut back to the previous end)."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            _write_fully(fd, line)
            os.fsync(fd)
        except BaseException as exc:
            os.ftruncate(fd, end)
            if isinstance(exc, OSError):
                raise _disk_full(exc, path.parent) from exc
            raise
    finally:
        os.close(fd)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a torn or edited file raises :class:`RunFileError` naming it."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                           "it was torn or edited — restore it or delete the run folder to retrain") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path} should hold a JSON object, got {type(value).__name__}")
    return value


def read_jsonl(path: Path, *, drop_torn_tail: bool = False) -> list[dict]:
    """Per-epoch records of ``path``, checked to be epochs 1, 2, …, n in order.

    ``drop_torn_tail`` tolerates an unterminated, unparsable last line (a crash mid-append; resume drops it).
    """
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if drop_torn_tail and number == len(lines) and not text.endswith("\n"):
                break
            raise RunFileError(f"{path}, line {number}: not a JSON record ({exc.msg}); the file was torn or "
                               "edited — restore it or delete the run folder to retrain") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise RunFileError(f"{path}, line {number}: expected an object with an integer 'epoch', got {line[:80]!r}")
        expected = len(records) + 1
        if record["epoch"] != expected:
            raise RunFileError(f"{path}, line {number}: epoch {record['epoch']} where epoch {expected} was expected "
                               "(a gap or repeat: the file was edited or two processes wrote it)")
        records.append(record)
    return records


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load`` failed, in a few words: the weights-only unpickler's own reason without torch's
    advice to load with ``weights_only=False`` (never for a file one does not trust), else the first sentence."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        detail = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        return "refused by the weights-only loader: " + (detail[0] if detail else type(exc).__name__)[:160]
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(exc).__name__
    return first[:200]


def _checked_config(config: Any, path: Path) -> dict:
    """A stored configuration of the shape :class:`~l2bn.train.config.TrainConfig` reads, else a
    :class:`RunFileError` naming ``path``."""
    if not isinstance(config, dict):
        raise RunFileError(f"{path}: its configuration should be a JSON object, got {type(config).__name__}; "
                           "it was edited — restore it or delete the run folder to retrain")
    if not isinstance(config.get("recipe", {}), dict):
        raise RunFileError(f"{path}: its configuration's 'recipe' should be a JSON object, got "
                           f"{type(config['recipe']).__name__}; it was edited — restore it or delete the run folder "
                           "to retrain")
    return config


class RunDir:
    """A run folder: paths, formats, completeness, identity, and every read and write of its files."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.timing_path = self.path / "timing.jsonl"
        self.summary_path = self.path / "summary.json"
        self.failure_path = self.path / "failed.json"
        self.last_path = self.path / "last.pt"
        self.best_path = self.path / "best.pt"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------ state
    def holds_run(self) -> bool:
        """Whether a run has started here (it logged or checkpointed an epoch)."""
        return self.metrics_path.is_file() or self.last_path.is_file()

    def is_complete(self) -> bool:
        """Whether a finished run is here (``summary.json``); :func:`l2bn.train.config.is_complete` also checks
        that it is of a given experiment."""
        return self.summary_path.is_file()

    def is_failed(self) -> bool:
        return self.failure_path.is_file()

    def stored_config(self) -> dict:
        """The configuration the run recorded where it cannot be edited by hand without notice: the summary's,
        else the last checkpoint's, else ``config.json`` (empty if none exists)."""
        summary = self.read_summary_if_any()
        if summary is not None and summary.get("config"):
            return _checked_config(summary["config"], self.summary_path)
        if self.last_path.is_file():
            return _checked_config(self.load_checkpoint(self.last_path)["config"], self.last_path)
        return _checked_config(read_json(self.config_path), self.config_path) if self.config_path.is_file() else {}

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder (flock on the folder itself: no lock file is left behind)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunBusyError(f"{self.path} is being trained by another process; skipping it") from None
            yield
        finally:
            os.close(fd)

    def remove_stale_temporaries(self) -> None:
        """Delete temporary files a killed writer left (call while holding :meth:`lock`)."""
        for path in self.path.glob(".*.tmp"):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ files
    def write_config(self, config: dict) -> None:
        write_atomic(self.config_path, json.dumps(config, indent=2).encode())

    def read_records(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def append_record(self, record: dict) -> None:
        append_line(self.metrics_path, record)

    def append_timing(self, record: dict) -> None:
        append_line(self.timing_path, record)

    def keep_epochs(self, epochs: int) -> None:
        """Keep the logs of epochs 1..``epochs`` (a killed run may have logged an epoch it did not checkpoint)."""
        for path in (self.metrics_path, self.timing_path):
            if path.is_file():
                kept = read_jsonl(path, drop_torn_tail=True)[:epochs]
                write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def clear_logs(self) -> None:
        for path in (self.metrics_path, self.timing_path, self.failure_path):
            path.unlink(missing_ok=True)

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.summary_path, json.dumps(summary, indent=2).encode())

    def read_summary(self) -> dict:
        summary = read_json(self.summary_path)
        if not isinstance(summary.get("best_test_acc"), (int, float)):
            raise RunFileError(f"{self.summary_path} has no numeric 'best_test_acc'; it was edited — restore it "
                               "or delete it to rebuild it by resuming the run")
        return summary

    def read_summary_if_any(self) -> dict | None:
        return self.read_summary() if self.summary_path.is_file() else None

    def record_failure(self, failure: dict) -> None:
        write_atomic(self.failure_path, json.dumps(failure, indent=2).encode())

    def read_failure(self) -> dict | None:
        return read_json(self.failure_path) if self.failure_path.is_file() else None

    def clear_failure(self) -> None:
        self.failure_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, state: dict, *, best: bool = False) -> None:
        """``torch.save`` ``state`` to ``best.pt`` or ``last.pt`` atomically."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self.best_path if best else self.last_path, buffer.getvalue())

    @staticmethod
    def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, for_resume: bool = False) -> dict:
        """Load one of our checkpoints safely (``weights_only=True``); anything else is a :class:`CheckpointError`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        hint = ("delete it to restart that run from epoch 1" if for_resume else
                "point at last.pt or best.pt of an l2bn run folder, and load only files you trust")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for foreign files
            raise CheckpointError(f"{path} is not a readable l2bn checkpoint ({_load_failure(exc)}); {hint}") from None
        needed = CHECKPOINT_KEYS + (RESUME_KEYS if for_resume else ())
        missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:
            what = "a dict without " + ", ".join(missing) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f"{path} is not an l2bn {'resume ' if for_resume else ''}checkpoint (it holds "
                                  f"{what}); {hint}")
        return ckpt

