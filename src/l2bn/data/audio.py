"""TAU Urban Acoustic Scenes 2020 Mobile (DCASE 2020 task 1a): layout, log-mel features, extraction cache.

The development set under ``data_dir`` (or one folder down, ``TAU-urban-acoustic-scenes-2020-mobile-
development/``) holds ``audio/<scene>-<city>-<location>-<segment>-<device>.wav``, ``meta.csv`` and the
tab-separated ``evaluation_setup/fold1_train.csv`` / ``fold1_evaluate.csv`` (header ``filename<TAB>scene_label``,
CRLF line endings tolerated). Features follow Hu et al.'s DCASE 2020 pipeline (MihawkHu/DCASE2020_task1,
``task1a/10class/extr_feat_2020_nodelta_scaled.py`` and ``utils.py:deltas``): see :func:`extract_features`.

Every clip's scaled log-mel spectrogram is extracted once, in parallel, into one memory-mapped ``.npy`` per
split plus an index, under a folder named by a hash of the extraction parameters (Δ and ΔΔ are computed on
loading, as the reference does: a third of the disk); an interrupted extraction resumes where it stopped.
Training samples are random crops of 400 of the 423 frames (after one frequency and one time mask per channel
when ``spec_masks`` is on, as Hu et al. do for FCNN / fsFCNN); evaluation uses the whole clip.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import threadpoolctl
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .vision import DataBundle, DataError

__all__ = [
    "DEVICES",
    "DEVICE_GROUPS",
    "SCENES",
    "AudioFeatureDataset",
    "FeatureParams",
    "SpecAugment",
    "extract_features",
    "extract_split",
    "read_split",
    "scaled_logmel",
    "stack_deltas",
    "tau2020",
    "with_spec_masks",
]

SCENES: tuple[str, ...] = (
    "airport", "bus", "metro", "metro_station", "park",
    "public_square", "shopping_mall", "street_pedestrian", "street_traffic", "tram",
)
DEVICES: tuple[str, ...] = ("a", "b", "c", "s1", "s2", "s3", "s4", "s5", "s6")
#: device groups of the DCASE 2020 task 1a report: s4–s6 appear only in the evaluation split.
DEVICE_GROUPS: dict[str, tuple[str, ...]] = {"s1-s3": ("s1", "s2", "s3"), "s4-s6": ("s4", "s5", "s6")}
SUBFOLDER = "TAU-urban-acoustic-scenes-2020-mobile-development"
SPLIT_FILES = {"train": "fold1_train.csv", "evaluate": "fold1_evaluate.csv"}
_FEATURE_VERSION = 2  # bump when the feature computation changes, so old caches are not reused


@dataclass(frozen=True)
class FeatureParams:
    """Extraction parameters; the defaults are the reference pipeline's (44.1 kHz, 10 s → 3 × 128 × 423).

    Tests scale them down (a lower ``sample_rate``, shorter ``duration``, fewer ``n_mels``); the cache key is
    a hash of every field, so changing any of them re-extracts.
    """

    sample_rate: int = 44100
    duration: float = 10.0
    n_fft: int = 2048
    hop_length: int = 1024
    n_mels: int = 128
    log_offset: float = 1e-8
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.duration <= 0 or self.log_offset <= 0:
            raise ValueError(f"duration and log_offset must be > 0, got {self.duration}, {self.log_offset}")
        if self.frames < 1:
            raise ValueError(
                f"{self.duration} s at hop {self.hop_length} gives {self.frames} frames after the delta trims"
            )

    @property
    def samples(self) -> int:
        """Samples kept per clip (the first ``duration`` seconds, zero-padded if shorter)."""
        return int(round(self.duration * self.sample_rate))

    @property
    def frames(self) -> int:
        """Frames of the feature: centred STFT frames (1 + samples // hop) less 4 on each side."""
        return 1 + self.samples // self.hop_length - 8

    @property
    def stft_frames(self) -> int:
        """Centred STFT frames of a clip: the cached log-mel is (n_mels, stft_frames)."""
        return 1 + self.samples // self.hop_length

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of :func:`extract_features`' output."""
        return (3, self.n_mels, self.frames)

    def key(self) -> str:
        """A short hash of the parameters (and the feature version): the cache folder's name."""
        text = json.dumps({**dataclasses.asdict(self), "version": _FEATURE_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def _deltas(x: Tensor) -> Tensor:
    """Δ[t] = (x[t+1] − x[t−1]) / 10 + (x[t+2] − x[t−2]) / 5 along the last axis, valid region (T − 4)."""
    return (x[..., 3:-1] - x[..., 1:-3]) / 10.0 + (x[..., 4:] - x[..., :-4]) / 5.0


def stack_deltas(logmel: Tensor) -> Tensor:
    """(n_mels, T) scaled log-mel → (3, n_mels, T − 8): [static[4:-4], Δ[2:-2], ΔΔ], in the input's dtype."""
    delta = _deltas(logmel)
    return torch.stack([logmel[:, 4:-4], delta[:, 2:-2], _deltas(delta)])


def _to_mono(waveform: np.ndarray) -> np.ndarray:
    """1-D, or 2-D with channels on the shorter axis (soundfile's (frames, channels) or (channels, frames))."""
    if waveform.ndim == 1:
        return waveform
    if waveform.ndim == 2:
        return waveform.mean(axis=int(np.argmin(waveform.shape)))
    raise ValueError(f"expected a waveform of shape (samples,) or (samples, channels), got {waveform.shape}")


def extract_features(
    waveform: np.ndarray | Tensor, sample_rate: int = 44100, params: FeatureParams | None = None
) -> Tensor:
    """Log-mel features with Δ and ΔΔ of one clip: float32 tensor (3, n_mels, frames), (3, 128, 423) for 10 s.

    Mono (channel mean); the first ``params.duration`` s (zero-padded); librosa power mel spectrogram (n_fft
    2048, hop 1024, Hann, centred frames with reflect padding as librosa < 0.10 did, 128 HTK bands from 0 to
    sr/2, no filter normalisation); ln(mel + 1e-8); min–max scaling of the clip to [0, 1] (float64, then
    float32 as the reference stores it); Δ along time and ΔΔ = Δ(Δ) in float32; channels [static[4:-4],
    Δ[2:-2], ΔΔ].

    Example: ``extract_features(soundfile.read("clip.wav")[0])``.
    """
    return stack_deltas(torch.from_numpy(scaled_logmel(waveform, sample_rate, params)))


def scaled_logmel(
    waveform: np.ndarray | Tensor, sample_rate: int = 44100, params: FeatureParams | None = None
) -> np.ndarray:
    """The min–max-scaled log-mel spectrogram (n_mels, stft_frames) float32 of :func:`extract_features`
    (what the cache stores)."""
    import librosa

    params = params or FeatureParams(sample_rate=sample_rate)
    if sample_rate != params.sample_rate:
        raise ValueError(f"sample_rate {sample_rate} differs from params.sample_rate {params.sample_rate}")
    y = np.asarray(waveform.detach().cpu().numpy() if isinstance(waveform, Tensor) else waveform, dtype=np.float64)
    y = _to_mono(y)[: params.samples]
    if y.shape[0] < params.samples:
        y = np.pad(y, (0, params.samples - y.shape[0]))
    mel = librosa.feature.melspectrogram(
        y=y, sr=sample_rate, n_fft=params.n_fft, hop_length=params.hop_length, window="hann", center=True,
        pad_mode=params.pad_mode, power=2.0, n_mels=params.n_mels, fmin=0.0, fmax=sample_rate / 2, htk=True,
        norm=None,
    )
    logmel = np.log(mel + params.log_offset)
    low, high = logmel.min(), logmel.max()
    logmel = (logmel - low) / (high - low) if high > low else np.zeros_like(logmel)
    return logmel.astype(np.float32)


# ----------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Split:
    """One evaluation-setup list: file names (relative to ``root``), label indices and devices."""

    root: Path
    name: str
    files: tuple[str, ...]
    labels: tuple[int, ...]
    devices: tuple[str, ...]


def find_root(data_dir: str | os.PathLike | None) -> Path:
    """The development-set folder: ``data_dir`` itself or its ``TAU-urban-...-development/`` subfolder."""
    if data_dir is None:
        raise DataError(
            f"tau2020: pass --data-dir, the folder holding audio/ and evaluation_setup/ (or {SUBFOLDER}/). "
            "The set is on Zenodo (record 3819968, TAU Urban Acoustic Scenes 2020 Mobile, development)."
        )
    base = Path(data_dir)
    for root in (base, base / SUBFOLDER):
        if (root / "evaluation_setup").is_dir():
            return root
    raise DataError(
        f"tau2020: no evaluation_setup/ in {base} or {base / SUBFOLDER}. Expected audio/*.wav, meta.csv and "
        "evaluation_setup/fold1_train.csv, fold1_evaluate.csv (TAU Urban Acoustic Scenes 2020 Mobile, "
        "development set, Zenodo record 3819968)."
    )


def device_of(filename: str) -> str:
    """The recording device: the file name's last ``-`` field (``audio/park-lyon-1-42-s2.wav`` → ``s2``)."""
    return Path(filename).stem.rsplit("-", 1)[-1]


def read_split(root: str | os.PathLike, split: str) -> Split:
    """Parse ``evaluation_setup/fold1_<split>.csv`` (``train`` or ``evaluate``); bad content is a DataError."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {tuple(SPLIT_FILES)}, got {split!r}")
    root = Path(root)
    path = root / "evaluation_setup" / SPLIT_FILES[split]
    if not path.is_file():
        raise DataError(f"tau2020: missing {path} (the fold-1 {split} list of the evaluation setup)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()  # splitlines drops \r\n and \n alike
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"tau2020: cannot read {path} ({exc})") from exc
    rows = [line.split("\t") for line in lines if line.strip()]
    header = [h.strip() for h in rows[0]] if rows else []
    if "filename" not in header or "scene_label" not in header:
        raise DataError(
            f"tau2020: {path} has columns {header}; expected a tab-separated header with 'filename' and 'scene_label'"
        )
    col_file, col_label = header.index("filename"), header.index("scene_label")
    files, labels = [], []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) <= max(col_file, col_label):
            raise DataError(f"tau2020: {path} line {number} has {len(row)} fields, expected {len(header)}: {row}")
        name, label = row[col_file].strip(), row[col_label].strip()
        if label not in SCENES:
            raise DataError(f"tau2020: {path} line {number}: unknown scene label {label!r}; expected one of {SCENES}")
        files.append(name)
        labels.append(SCENES.index(label))
    if not files:
        raise DataError(f"tau2020: {path} lists no clips")
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"tau2020: {len(missing)} clip(s) listed in {path} are missing under {root}, e.g. {root / missing[0]}"
        )
    return Split(root, split, tuple(files), tuple(labels), tuple(device_of(f) for f in files))


# ------------------------------------------------------------------------------------------------ cache
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
    if waveform.shape[0] == 0:
        raise DataError(f"tau2020: {path} holds no samples")
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


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (blocking): one extraction of a split at a time."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


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
             "params": dataclasses.asdict(params), "shape": [len(split.files), params.n_mels, params.stft_frames]}
    if _complete(folder, index):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder):  # another process (compare --jobs, a second run) waits, then finds it done
        if not _complete(folder, index):
            _extract_missing(folder, split, params, index, workers, chunk, progress)
    return folder


def _complete(folder: Path, index: dict) -> bool:
    path = folder / "index.json"
    return path.is_file() and json.loads(path.read_text()) == index


def _extract_missing(folder: Path, split: Split, params: FeatureParams, index: dict, workers: int | None,
                     chunk: int, progress: bool | None) -> None:
    """Extract the clips ``done.npy`` does not mark (all of them for a new manifest), then write the index."""
    features_path, done_path, manifest_path = folder / "logmel.npy", folder / "done.npy", folder / "manifest.json"
    manifest = {k: index[k] for k in ("files", "params", "shape")}
    fresh = not (manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest
                 and features_path.is_file() and done_path.is_file())
    if fresh:
        (folder / "index.json").unlink(missing_ok=True)
        np.lib.format.open_memmap(features_path, mode="w+", dtype=np.float32, shape=tuple(index["shape"])).flush()
        np.save(done_path, np.zeros(len(split.files), dtype=np.uint8))
        _atomic_json(manifest_path, manifest)
    done = np.load(done_path, mmap_mode="r+")
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


# ---------------------------------------------------------------------------------------------- dataset
class SpecAugment:
    """One frequency mask (width 0…``freq_width``−1 bins) and one time mask (0…``time_width``−1 frames) per
    channel, set to zero, as Hu et al.'s ``frequency_masking`` / ``time_masking`` (13 and 40 exclusive)."""

    def __init__(self, freq_width: int = 13, time_width: int = 40) -> None:
        if freq_width < 1 or time_width < 1:
            raise ValueError(f"mask widths must be >= 1, got {freq_width}, {time_width}")
        self.freq_width, self.time_width = freq_width, time_width

    def __call__(self, x: Tensor) -> Tensor:
        x = x.clone()
        _, bins, frames = x.shape
        for c in range(x.shape[0]):
            for axis, size, width in ((1, bins, self.freq_width), (2, frames, self.time_width)):
                w = int(torch.randint(0, min(width, size), ()))
                if w == 0:
                    continue
                start = int(torch.randint(0, size - w, ()))
                x[c].narrow(axis - 1, start, w).zero_()
        return x

    def __repr__(self) -> str:
        return f"SpecAugment(freq_width={self.freq_width}, time_width={self.time_width})"


class AudioFeatureDataset(Dataset):
    """Features (3, n_mels, frames) of one cached split — log-mel memory-mapped and opened lazily in each
    process, Δ / ΔΔ computed per item — with labels (``targets``), ``devices`` and ``classes``.

    ``crop``: frames of a random crop (training) or ``None`` for the whole clip; ``augment`` runs before it.
    """

    def __init__(self, folder: str | os.PathLike, crop: int | None = None, augment: SpecAugment | None = None) -> None:
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.files: list[str] = index["files"]
        self.targets: list[int] = index["labels"]
        self.devices: list[str] = index["devices"]
        count, n_mels, stft_frames = index["shape"]
        self.shape = (count, 3, n_mels, stft_frames - 8)
        if crop is not None and not 1 <= crop <= self.shape[-1]:
            raise ValueError(f"crop must be in [1, {self.shape[-1]}] frames, got {crop}")
        self.crop, self.augment = crop, augment
        self.classes = SCENES
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}  # never pickle the memory map's data into workers

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self._array is None:
            self._array = np.load(self.folder / "logmel.npy", mmap_mode="r")
        x = stack_deltas(torch.from_numpy(np.array(self._array[index])))
        if self.augment is not None:
            x = self.augment(x)
        if self.crop is not None and self.crop < x.shape[-1]:
            start = int(torch.randint(0, x.shape[-1] - self.crop, ()))  # as the reference: never the last start
            x = x[..., start : start + self.crop]
        return x, self.targets[index]


def _extract_on_rank0(splits: dict[str, Split], params: FeatureParams, cache_dir, workers) -> dict[str, Path]:
    """Extract on rank 0 only under ``torch.distributed``: the other ranks wait for its outcome (a bad clip
    raises the same DataError on every rank, none is left waiting), then find the cache complete."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return {s: extract_split(split, params, cache_dir, workers=workers) for s, split in splits.items()}
    outcome: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            for split in splits.values():
                extract_split(split, params, cache_dir, workers=workers)
        except DataError as exc:
            outcome = [str(exc)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise DataError(outcome[0])
    return {s: extract_split(split, params, cache_dir, workers=0) for s, split in splits.items()}


def _scaled_masks(n_mels: int, frames: int) -> SpecAugment:
    """The reference's mask widths (13 of 128 bins, 40 of 423 frames, exclusive) scaled to these features."""
    return SpecAugment(max(1, round(13 * n_mels / 128)), max(1, round(40 * frames / 423)))


def with_spec_masks(data: DataBundle) -> DataBundle:
    """``data`` with :class:`SpecAugment` (widths scaled to its features) on the training split, applied to
    the whole clip before the random crop — the FCNN / fsFCNN recipes' masks. Only for audio bundles."""
    if not isinstance(data.train, AudioFeatureDataset):
        raise ValueError(f"spec_masks needs an acoustic-scene dataset (tau2020), got {data.name!r}")
    _, _, n_mels, frames = data.train.shape
    train = AudioFeatureDataset(data.train.folder, crop=data.train.crop, augment=_scaled_masks(n_mels, frames))
    return dataclasses.replace(data, train=train)


#: Extraction parameters of ``build_data("tau2020")`` (tests substitute scaled-down ones).
DEFAULT_PARAMS = FeatureParams()


def tau2020(
    data_dir: str | os.PathLike | None = None,
    *,
    augment: bool = True,
    spec_masks: bool = False,
    params: FeatureParams | None = None,
    crop: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> DataBundle:
    """TAU Urban Acoustic Scenes 2020 Mobile, fold 1: ``train`` (random crops), ``train_eval`` and ``test``
    (``fold1_evaluate``, whole clips). ``test.devices`` gives each clip's device for per-device accuracy.

    ``crop`` defaults to 400 frames scaled by ``params.frames / 423`` (400 of 423 at the reference setting);
    ``spec_masks`` adds :class:`SpecAugment` with the reference's widths scaled the same way.
    """
    params = params or DEFAULT_PARAMS
    root = find_root(data_dir)
    splits = {s: read_split(root, s) for s in SPLIT_FILES}
    folders = _extract_on_rank0(splits, params, cache_dir, workers)
    scale = params.frames / 423
    crop = crop or max(1, min(params.frames, round(400 * scale)))
    masks = _scaled_masks(params.n_mels, params.frames) if spec_masks else None
    return DataBundle(
        name="tau2020",
        train=AudioFeatureDataset(folders["train"], crop=crop, augment=masks) if augment else
        AudioFeatureDataset(folders["train"]),
        train_eval=AudioFeatureDataset(folders["train"]),
        test=AudioFeatureDataset(folders["evaluate"]),
        num_classes=len(SCENES),
        in_channels=3,
        image_size=params.n_mels,
    )
