"""One run's configuration: :class:`TrainConfig`, the fields that define its experiment and their checks."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .ddp import check_device
from .recipes import Recipe, default_recipe_name, get_recipe
from .rundir import RunDir, check_out_dir

__all__ = ["AMP_DTYPES", "AUGMENT_MODES", "IDENTITY_FIELDS", "TrainConfig", "check_same_experiment", "is_complete", "stored_identity"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Config fields that define the experiment: resuming with any of them changed is refused, and a finished
# run counts as done for a grid only if they all match.
IDENTITY_FIELDS = ("dataset", "model", "norm", "seed", "recipe", "placement", "train_subset", "model_kwargs", "amp",
                   "channels_last", "val_size", "imbalance", "label_noise", "augment")
# How the training images are augmented: torchvision's per-sample transforms in the DataLoader, or whole
# batches with tensor ops (l2bn.data.batched; in-memory image sets only; other random draws, same distribution).
AUGMENT_MODES = ("per-sample", "batched")


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


@dataclass
class TrainConfig:
    """Everything one run needs; ``recipe`` defaults to the preset for (dataset, model family).

    ``placement`` puts the norm into named model parts only (the paper's Table 4); ``train_subset=N`` trains
    on a stratified N-sample subset of the training set (the same one for every seed and norm). Then, from
    that training set (:func:`l2bn.data.training_split.carve_training_split`, fixed seeds): ``val_size``
    images are held out for epoch selection, ``imbalance=r`` keeps a long-tailed profile whose largest class
    has r times the images of the smallest, ``label_noise=p`` flips a share p of the training labels.
    ``augment="batched"`` crops and flips whole training batches with tensor ops (one generator draw a batch,
    equal in distribution to the per-sample transforms, not the same draws; in-memory image sets only).
    """

    dataset: str = "digits"
    model: str = "resnet20"
    norm: str = "bn"
    seed: int = 121
    out: str = "runs/train"
    recipe: Recipe | None = None
    placement: str = "all"
    train_subset: int | None = None
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    threads: int | None = None
    progress: bool | None = None
    sync_bn: bool = False
    resume: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    val_size: int | None = None
    imbalance: float | None = None
    label_noise: float = 0.0
    augment: str = "per-sample"

    def __post_init__(self) -> None:
        if self.recipe is None:
            self.recipe = get_recipe(default_recipe_name(self.dataset, self.model))
        elif isinstance(self.recipe, dict):
            self.recipe = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.recipe.items()})
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {self.amp!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"train_subset must be >= 1 (or None: the whole training set), got {self.train_subset}")
        if self.val_size is not None and self.val_size < 1:
            raise ValueError(f"val_size must be >= 1 (or None: no validation split), got {self.val_size}")
        if self.imbalance is not None and not self.imbalance >= 1:
            raise ValueError(f"imbalance must be >= 1 (largest class / smallest; None: as the data is), got "
                             f"{self.imbalance}")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if self.augment not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {list(AUGMENT_MODES)}, got {self.augment!r}")
        if "placement" in self.model_kwargs:
            raise ValueError("placement is a TrainConfig field, not a model_kwargs entry")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d

    def identity(self) -> dict[str, Any]:
        """The fields that define the experiment (:data:`IDENTITY_FIELDS`), as JSON values."""
        d = self.to_dict()
        return {k: _jsonable(d[k]) for k in IDENTITY_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """A config from :meth:`to_dict` (also reads older runs that kept placement in ``model_kwargs``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        kwargs = dict(d.get("model_kwargs") or {})
        if "placement" in kwargs:
            d["placement"], d["model_kwargs"] = kwargs.pop("placement"), kwargs
        return cls(**d)

    def validate(self) -> None:
        """Check what only matters before running (device, folders); raises ``ValueError`` naming the value."""
        check_device(self.device)
        check_out_dir(self.out)
        if self.data_dir is not None and Path(self.data_dir).exists() and not Path(self.data_dir).is_dir():
            raise ValueError(f"--data-dir {self.data_dir} is a file; pass the folder holding the dataset")


def stored_identity(run: RunDir) -> dict | None:
    """The experiment identity of the run stored in ``run`` (:meth:`TrainConfig.identity`); ``None`` if none is."""
    config = run.stored_config()
    return TrainConfig.from_dict(config).identity() if config else None


def is_complete(out: str | os.PathLike, config: TrainConfig | None = None) -> bool:
    """Whether ``out`` holds a finished run, of the same experiment if ``config`` is given."""
    run = RunDir(out)
    return run.is_complete() and (config is None or stored_identity(run) == config.identity())


def check_same_experiment(saved: dict, config: TrainConfig, path: Path) -> None:
    """Refuse to resume the run saved with config ``saved`` under a ``config`` of another experiment."""
    theirs, mine = TrainConfig.from_dict(saved).identity(), config.identity()
    diff = [k for k in IDENTITY_FIELDS if theirs[k] != mine[k]]
    if diff:
        details = "; ".join(f"{k}: checkpoint {theirs[k]!r} vs now {mine[k]!r}" for k in diff)
        raise ValueError(f"cannot resume {path}: the experiment changed ({details})")
