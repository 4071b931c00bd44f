"""The TAU 2020 Mobile dataset over the cache: random 400-of-423-frame crops for training (after one frequency
and one time mask per channel when ``spec_masks`` is on, as Hu et al. do for FCNN / fsFCNN), whole clips for
evaluation; :func:`tau2020` builds the :class:`~l2bn.data.base.DataBundle`."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..base import DataBundle, DataError
from .cache import extract_split
from .features import FeatureParams, stack_deltas
from .layout import SCENES, SPLIT_FILES, Split, find_root, read_split

__all__ = ["DEFAULT_PARAMS", "AudioFeatureDataset", "SpecAugment", "tau2020", "with_spec_masks"]


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
