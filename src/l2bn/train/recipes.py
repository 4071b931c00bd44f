"""Training recipes: the paper's supplementary Table 1 as named presets, plus quick CPU presets.

Every preset is a frozen :class:`Recipe`; ``get_recipe(name, **overrides)`` returns a copy with any field
replaced (the CLI maps each ``--flag`` to a field). All paper recipes use SGD with Nesterov momentum 0.9;
CIFAR runs use seeds 121–125. The ``tau2020-*`` presets are the acoustic-scene recipes of Hu et al. and
McDonnell & Gao (the paper's Table 6): SGD without Nesterov, cosine with warm restarts stepped every batch,
per-sample mixup, conv-weights-only weight decay and, for FCNN / fsFCNN, spectrogram masks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = [
    "Recipe", "RECIPES", "get_recipe", "list_recipes", "default_recipe_name", "PAPER_SEEDS", "warm_restart_factor",
]

PAPER_SEEDS: tuple[int, ...] = (121, 122, 123, 124, 125)
SCHEDULES = ("cosine", "step", "constant", "cosine-restarts")
WEIGHT_DECAY_SCOPES = ("all", "conv")


@dataclass(frozen=True)
class Recipe:
    """Optimiser, schedule and regularisation of one training run (SGD with (Nesterov) momentum).

    ``schedule``: ``cosine`` decays to 0 at the last epoch after ``warmup_epochs`` of linear warm-up;
    ``step`` multiplies by ``gamma`` at each epoch in ``milestones``; ``constant`` keeps ``lr``;
    ``cosine-restarts`` (SGDR, Loshchilov & Hutter 2017) runs cosine cycles of ``restart_cycles`` epochs
    from ``lr`` down to ``min_lr`` (see :func:`warm_restart_factor`).
    ``metrics_every``: epochs between angle-metric evaluations (the last epoch is always measured).
    ``weight_decay_scope``: ``all`` parameters (as the norm zoo's groups say) or ``conv`` weights only (the
    Keras references' L2 kernel regulariser: a penalty c·Σw² is weight decay 2c). ``mixup_per_sample`` draws
    one λ per sample instead of one per batch; ``spec_masks`` turns on the dataset's spectrogram masks;
    ``norm_spread`` logs the spread of the per-sample input norms of every norm layer (:mod:`l2bn.norm_spread`).
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0
    momentum: float = 0.9
    nesterov: bool = True
    mixup_alpha: float = 0.0
    label_smoothing: float = 0.0
    seeds: tuple[int, ...] = PAPER_SEEDS
    metrics_every: int = 10
    metrics_max_batches: int | None = None
    restart_cycles: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)
    min_lr: float = 0.0
    weight_decay_scope: str = "all"
    mixup_per_sample: bool = False
    spec_masks: bool = False
    norm_spread: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "gamma", "momentum", "mixup_alpha", "label_smoothing"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "metrics_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, 0 <= momentum < 1; got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, momentum={self.momentum}"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if self.mixup_alpha < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"need mixup_alpha >= 0 and 0 <= label_smoothing < 1; got {self.mixup_alpha}, {self.label_smoothing}"
            )
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        if self.schedule == "step" and self.milestones and self.milestones[0] <= self.warmup_epochs:
            raise ValueError(f"milestones must come after the {self.warmup_epochs} warm-up epochs, got {self.milestones}")
        if not self.restart_cycles or min(self.restart_cycles) < 1:
            raise ValueError(f"restart_cycles must be positive epoch counts, got {self.restart_cycles}")
        if not 0 <= self.min_lr < self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}), got {self.min_lr}")
        if self.weight_decay_scope not in WEIGHT_DECAY_SCOPES:
            raise ValueError(
                f"weight_decay_scope must be one of {WEIGHT_DECAY_SCOPES}, got {self.weight_decay_scope!r}"
            )
        if self.gamma <= 0:
            raise ValueError(f"gamma (the step schedule's factor) must be > 0, got {self.gamma}")
        if self.metrics_max_batches is not None and self.metrics_max_batches < 1:
            raise ValueError(
                f"metrics_max_batches must be >= 1 (or unset: every batch), got {self.metrics_max_batches}")

    def replace(self, **overrides) -> "Recipe":
        """A copy with ``overrides`` applied; ``None`` values are ignored (unset CLI flags)."""
        known = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"unknown recipe field(s) {bad}; fields: {sorted(known)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        for key in ("milestones", "seeds", "restart_cycles"):
            if key in given:
                given[key] = tuple(int(v) for v in given[key])
        return dataclasses.replace(self, **given)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def warm_restart_factor(recipe: Recipe, epoch_progress: float) -> float:
    """Multiplier of ``recipe.lr`` for ``cosine-restarts`` after ``epoch_progress`` (fractional) epochs.

    Within a cycle of T epochs started at epoch s: lr = min_lr + (lr − min_lr)·(1 + cos(π (t − s) / T)) / 2,
    as Hu et al.'s ``LR_WarmRestart`` (restarts after epochs 2, 6, 14, ... for cycles 2, 4, 8, ...); after
    the last cycle the rate stays at ``min_lr``.
    """
    start = 0.0
    for length in recipe.restart_cycles:
        if epoch_progress < start + length:
            cosine = 0.5 * (1.0 + math.cos(math.pi * (epoch_progress - start) / length))
            return (recipe.min_lr + (recipe.lr - recipe.min_lr) * cosine) / recipe.lr
        start += length
    return recipe.min_lr / recipe.lr


_CIFAR_RESNET = Recipe(epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4)
_TAU2020 = dict(
    batch_size=32, lr=0.1, min_lr=1e-5, schedule="cosine-restarts", momentum=0.9, nesterov=False,
    mixup_alpha=0.4, mixup_per_sample=True,
)
RECIPES: dict[str, Recipe] = {
    # supplementary Table 1, CIFAR-100
    "cifar-resnet": _CIFAR_RESNET,
    "cifar-vgg": _CIFAR_RESNET,
    "cifar-densenet": Recipe(
        epochs=300, batch_size=64, lr=0.1, weight_decay=1e-4, schedule="step", milestones=(150, 225), gamma=0.1
    ),
    "cifar-regnet": Recipe(
        epochs=200, batch_size=512, lr=0.5, weight_decay=5e-4, warmup_epochs=5, mixup_alpha=0.5, label_smoothing=0.1
    ),
    "cifar-resnext": Recipe(epochs=300, batch_size=128, lr=0.1, weight_decay=5e-4),
    # supplementary Table 1, ImageNet ResNet / ResNeXt
    "imagenet-resnet": Recipe(
        epochs=100, batch_size=256, lr=0.2, weight_decay=5e-5, seeds=(121,), metrics_every=10, metrics_max_batches=50
    ),
    # the paper's Table 6 (TAU 2020 Mobile): McDonnell & Gao's ResNet-17, Hu et al.'s FCNN / fsFCNN
    "tau2020-resnet": Recipe(epochs=126, weight_decay=2e-3, weight_decay_scope="conv", **_TAU2020),
    "tau2020-fcnn": Recipe(epochs=254, weight_decay=0.0, spec_masks=True, **_TAU2020),
    # quick CPU presets (not in the paper): sized so BN vs L2BN differences show in minutes
    "digits-quick": Recipe(epochs=15, batch_size=64, lr=0.05, weight_decay=5e-4, seeds=(121, 122, 123), metrics_every=1),
    "fashion-mnist-quick": Recipe(
        epochs=10, batch_size=128, lr=0.1, weight_decay=5e-4, seeds=(121, 122, 123), metrics_every=1,
        metrics_max_batches=40,
    ),
}
# Presets by dataset for every model (quick CPU presets), and by (dataset kind, model family) for the paper's.
_DATASET_RECIPES = {"digits": "digits-quick", "fashion-mnist": "fashion-mnist-quick"}
_FAMILY_RECIPES = {
    ("cifar", "resnet"): "cifar-resnet",
    ("cifar", "vgg"): "cifar-vgg",
    ("cifar", "densenet"): "cifar-densenet",
    ("cifar", "regnet"): "cifar-regnet",
    ("cifar", "resnext"): "cifar-resnext",
    ("imagenet", "resnet"): "imagenet-resnet",
    ("imagenet", "resnext"): "imagenet-resnet",
    ("asc", "asc-resnet"): "tau2020-resnet",
    ("asc", "fcnn"): "tau2020-fcnn",
}
_DATASET_KINDS = {"cifar10": "cifar", "cifar100": "cifar", "imagenet": "imagenet", "tau2020": "asc"}


def list_recipes() -> list[str]:
    """Preset names."""
    return sorted(RECIPES)


def default_recipe_name(dataset: str, model: str) -> str:
    """The preset the paper used for ``model`` on ``dataset`` (quick presets for digits / Fashion-MNIST).

    The model's family comes from the model registry (``l2bn.models``); a family without a preset for the
    dataset is an error naming the way out (``--recipe``), never silently another family's recipe.
    """
    from ..data import list_datasets
    from ..models import get_model_entry

    key = dataset.lower().replace("_", "-").replace("fashionmnist", "fashion-mnist")
    if key not in list_datasets():
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(list_datasets())}")
    if key in _DATASET_RECIPES:
        return _DATASET_RECIPES[key]
    entry = get_model_entry(model)
    kind = _DATASET_KINDS.get(key)
    if kind is None:
        raise ValueError(
            f"no default recipe for dataset {dataset!r}; pass --recipe (one of {', '.join(list_recipes())})")
    name = _FAMILY_RECIPES.get((kind, entry.family))
    if name is None:
        raise ValueError(f"no {kind} recipe for model {entry.name!r} (family {entry.family!r}); pass --recipe "
                         f"(one of {', '.join(list_recipes())})")
    return name


def get_recipe(name: str, **overrides) -> Recipe:
    """Preset ``name`` with ``overrides`` (field → value; ``None`` means keep the preset's value)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(list_recipes())}")
    return RECIPES[name].replace(**overrides)
