"""The extraction cache: every clip's scaled log-mel spectrogram extracted once, in parallel (one BLAS thread
a worker), into one memory-mapped ``logmel.npy`` per split plus ``index.json``, under a folder named by a hash
of the extraction parameters (Δ and ΔΔ are computed on loading: a third of the disk); an interrupted
extraction resumes where it stopped. Every load checks the cache against its index (whole arrays, readable
JSON, each clip's size and modification time) and re-extracts what fails the check."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import threadpoolctl
import torch
from tqdm.auto import tqdm

from ...folder_lock import folder_lock
from ..base import DataError
from .features import FeatureParams, scaled_logmel
from .layout import Split

__all__ = ["default_cache_dir", "extract_split"]


def _read_clip(path: Path, params: FeatureParams) -> np.ndarray:
    """Read one wav with soundfile and return its :func:`scaled_logmel`; any failure is a DataError naming
    the file."""
    import soundfile

    try:
        waveform, rate = soundfile.read(str(path), frames=params.samples, dtype="float64", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError on bad headers
        raise DataError(f"tau2020: cannot read {path} ({type(exc).__name__}: {exc})") from None
    if rate != params.sample_rate:
        raise DataError(f"tau2020: {path} is sampled at {rate} Hz, expected {params.sample_rate} Hz")
    if waveform.shape[0] < params.samples:
        raise DataError(f"tau2020: {path} holds {waveform.shape[0]} samples, fewer than the {params.samples} "
                        f"({params.duration:g} s) of a clip: it is truncated — copy it again from the archive")
    if not np.isfinite(waveform).all():
        raise DataError(f"tau2020: {path} holds NaN or infinite samples — copy it again from the archive")
    return scaled_logmel(waveform.mean(axis=1), rate, params)


_WORKER: dict = {}


def _open_output(features_path: str, root: str, files: Sequence[str], params: FeatureParams) -> None:
    _WORKER.update(out=np.load(features_path, mmap_mode="r+"), root=Path(root), files=files, params=params)


def _worker_init(*args) -> None:
    # One clip per process at a time: the parallelism is across processes. numpy's BLAS threads too (librosa's
    # mel projection): two 2-thread workers on 2 cores ran slower than one serial process.
    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)
    _open_output(*args)


def _worker_run(indices: Sequence[int]) -> list[int]:
    out, root, files, params = _WORKER["out"], _WORKER["root"], _WORKER["files"], _WORKER["params"]
    for i in indices:
        out[i] = _read_clip(root / files[i], params)
    out.flush()
    return list(indices)


def default_cache_dir(root: Path) -> Path:
    """``<root>/.l2bn-cache`` when the data folder is writable, else ``$L2BN_CACHE`` or ``~/.cache/l2bn``."""
    if os.access(root, os.W_OK):
        return root / ".l2bn-cache"
    base = Path(os.environ.get("L2BN_CACHE", Path.home() / ".cache" / "l2bn"))
    return base / "tau2020" / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    """A JSON object of the cache, or ``None`` when it is missing, garbled or not an object (then rebuilt)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _npy_whole(path: Path, shape: Sequence[int], dtype: np.dtype) -> bool:
    """Whether ``path`` is a ``.npy`` of ``shape`` and ``dtype`` (C order) holding all its bytes — a truncated
    file would be zero-extended by an ``r+`` memory map, or refused by an ``r`` one."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            found, fortran, kind = read(f)
            start = f.tell()
    except (OSError, ValueError):
        return False
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return (tuple(found), fortran, kind) == (tuple(shape), False, np.dtype(dtype)) and \
        path.stat().st_size >= start + size


def _fingerprints(split: Split) -> list[list[int]]:
    """Each clip's (size, modification time in ns): a clip edited or replaced after caching is re-extracted."""
    stats = [(split.root / f).stat() for f in split.files]
    return [[st.st_size, st.st_mtime_ns] for st in stats]


def extract_split(
    split: Split,
    params: FeatureParams,
    cache_dir: str | os.PathLike | None = None,
    *,
    workers: int | None = None,
    chunk: int = 8,
    progress: bool | None = None,
) -> Path:
    """Extract every clip of ``split`` into ``<cache>/<params.key()>/<split>/logmel.npy`` (N, n_mels, stft
    frames), float32, once.

    Clips are written in place into a memory-mapped ``.npy`` and marked in ``done.npy`` after they are
    flushed, so an interrupted run resumes with the missing clips only; ``index.json`` (file names, labels,
    devices, parameters) is written last, atomically, and marks the cache complete. ``workers`` processes
    (default: all CPUs; 0 = this process) extract ``chunk`` clips a task. Returns the split's folder.
    """
    folder = Path(cache_dir or default_cache_dir(split.root)) / params.key() / split.name
    index = {"files": list(split.files), "labels": list(split.labels), "devices": list(split.devices),
             "params": dataclasses.asdict(params), "shape": [len(split.files), params.n_mels, params.stft_frames],
             "fingerprints": _fingerprints(split)}
    if _complete(folder, index):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):  # another process (compare --jobs, a second run) waits, then finds it done
        if not _complete(folder, index):
            _extract_missing(folder, split, params, index, workers, chunk, progress)
    return folder


def _complete(folder: Path, index: dict) -> bool:
    """Whether the index matches (clips' fingerprints included) and ``logmel.npy`` holds every byte."""
    return _read_json(folder / "index.json") == index and \
        _npy_whole(folder / "logmel.npy", index["shape"], np.dtype(np.float32))


def _prepare(folder: Path, index: dict) -> np.ndarray:
    """``done.npy`` as a writable map: kept from an earlier extraction of the same files and parameters whose
    arrays are whole (clips whose fingerprint changed are unmarked), else both arrays made anew."""
    features_path, done_path, manifest_path = folder / "logmel.npy", folder / "done.npy", folder / "manifest.json"
    manifest = {k: index[k] for k in ("files", "params", "shape", "fingerprints")}
    stored = _read_json(manifest_path) or {}
    count = len(index["files"])
    reuse = (all(stored.get(k) == manifest[k] for k in ("files", "params", "shape"))
             and len(stored.get("fingerprints") or ()) == count
             and _npy_whole(features_path, index["shape"], np.dtype(np.float32))
             and _npy_whole(done_path, (count,), np.dtype(np.uint8)))
    (folder / "index.json").unlink(missing_ok=True)
    if not reuse:
        np.lib.format.open_memmap(features_path, mode="w+", dtype=np.float32, shape=tuple(index["shape"])).flush()
        np.save(done_path, np.zeros(count, dtype=np.uint8))
    done = np.load(done_path, mmap_mode="r+")
    if reuse:
        changed = [i for i, (old, new) in enumerate(zip(stored["fingerprints"], index["fingerprints"])) if old != new]
        done[changed] = 0
        done.flush()
    _atomic_json(manifest_path, manifest)
    return done


def _extract_missing(folder: Path, split: Split, params: FeatureParams, index: dict, workers: int | None,
                     chunk: int, progress: bool | None) -> None:
    """Extract the clips ``done.npy`` does not mark (all of them for a new manifest), then write the index."""
    features_path = folder / "logmel.npy"
    done = _prepare(folder, index)
    todo = [int(i) for i in np.flatnonzero(done == 0)]
    chunks = [todo[k : k + chunk] for k in range(0, len(todo), chunk)]
    workers = min(os.cpu_count() or 1, len(chunks)) if workers is None else min(workers, len(chunks))
    show = (os.isatty(2) if progress is None else progress) and bool(todo)
    bar = tqdm(total=len(split.files), initial=len(split.files) - len(todo), unit="clip", disable=not show,
               desc=f"tau2020 {split.name} features")
    args = (str(features_path), str(split.root), split.files, params)
    try:
        if workers <= 0:
            _open_output(*args)
            _mark(map(_worker_run, chunks), done, bar)
        else:
            with ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_worker_init,
                                     initargs=args) as pool:
                _mark(pool.map(_worker_run, chunks), done, bar)
    finally:
        bar.close()
        _WORKER.clear()
    _atomic_json(folder / "index.json", index)


def _worker_context() -> multiprocessing.context.BaseContext:
    """``fork`` (fast) unless this process holds CUDA or a process group, where only ``spawn`` is safe."""
    dist = torch.distributed
    busy = torch.cuda.is_initialized() or (dist.is_available() and dist.is_initialized())
    if busy or "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


def _mark(results, done: np.ndarray, bar) -> None:
    for indices in results:
        done[indices] = 1
        done.flush()
        bar.update(len(indices))
