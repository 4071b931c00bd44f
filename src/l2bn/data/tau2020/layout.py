"""The development set's folder layout: ``data_dir`` (or one folder down, ``TAU-urban-acoustic-scenes-2020-
mobile-development/``) holds ``audio/<scene>-<city>-<location>-<segment>-<device>.wav``, ``meta.csv`` and the
tab-separated ``evaluation_setup/fold1_train.csv`` / ``fold1_evaluate.csv`` (header
``filename<TAB>scene_label``, CRLF line endings and a UTF-8 byte-order mark tolerated)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..base import DataError

__all__ = ["DEVICES", "DEVICE_GROUPS", "SCENES", "SPLIT_FILES", "SUBFOLDER", "Split", "device_of", "find_root", "read_split"]

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
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a leading BOM is dropped; \r\n and \n alike
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
