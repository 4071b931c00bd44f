"""The studies of the paper's tables on Fashion-MNIST, as data: what each one trains and how it was sized.

A :class:`Study` is one or more comparison grids (:func:`l2bn.train.compare`) sharing a recipe, seeds and
training subset; each grid trains into its own folder under the study's folder. Sizes were chosen from one
measured ResNet-20 Fashion-MNIST epoch (:data:`EPOCH_SECONDS`) so that the four studies total about six
hours of this 2-core machine.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from ..norms import list_norms
from ..train.config import TrainConfig
from ..train.recipes import PAPER_SEEDS, Recipe, get_recipe

__all__ = ["CONTENDED_TIMING", "EPOCH_SECONDS", "FAST_PATH", "STEP_RATIO", "STUDY_JOBS", "THREADS_PER_RUN", "Grid", "STUDIES", "Study", "StudyOverrides",
           "estimate_seconds", "get_study", "list_studies"]

DATASET, MODEL, RECIPE = "fashion-mnist", "resnet20", "fashion-mnist-quick"
# The comparison zoo in the order it is registered (the paper's: BN, L2BN, Table 5's norms, Table 3's, then UBN),
# less PN on its own (Table 3 compares PN only inside PN+BN).
ZOO = tuple(name for name in list_norms(sort=False) if name != "pn")
PLACEMENTS = ("none", "classifier", "stage1", "stage2-3", "all")

# The basis of the sizing: one ResNet-20 Fashion-MNIST epoch of the fashion-mnist-quick recipe (BN, batch 128,
# 469 steps) with `--threads 2` on this machine (2-core Intel Xeon), uncontended: training 132.2 s, evaluation
# with the angle metrics 15.4 s (docs/performance.md, "Runner", 2026-11-22). The evaluation is a test pass
# (10000 images) plus the train-side pass for the class centers (40 batches of 256 = 10240 images), so the
# test pass alone is taken as 10000 / 20240 of it.
EPOCH_SECONDS: dict[str, tuple[int, float, float]] = {"full set": (60_000, 132.2, 15.4)}
TEST_PASS_SECONDS = 15.4 * 10_000 / 20_240
# Timed again for this sizing on 2026-12-01 (`python -m l2bn train --dataset fashion-mnist --epochs 1
# --threads 2`) while four sessions shared the two cores (load average 6): the full-set epoch did not finish
# within 15 minutes, the 10000-sample-subset epoch took 245.8 s training (40.6 images/s, 11.6x slower than
# uncontended) + 83.2 s evaluation. Contended times say nothing about the studies' cost; the estimate uses
# the uncontended basis above, and each page reports the time its runs really took.
CONTENDED_TIMING = ("2026-12-01, load average 6 on 2 cores: full-set epoch unfinished after 15 min; "
                    "10000-sample subset 245.8 s training + 83.2 s evaluation")
# Every run of a study computes with one CPU thread: the sums of a 1-thread and a 2-thread run differ in order,
# so their records differ (docs/performance.md, "compare --jobs"); with the threads fixed, a run's records are
# the same whether the grid runs with --jobs 1 or 2. Two single-thread runs at once (STUDY_JOBS) use the two
# cores; they were measured 4.5x faster than one 2-thread run on the shared machine.
THREADS_PER_RUN = 1
STUDY_JOBS = 2
# Training-step time of ResNet-20 (batch 128, 28x28, one thread) with each norm relative to BN, measured
# interleaved on 2026-12-01 (min of two rounds of 2 steps): the comparison zoo's non-BN layers are
# composed of torch ops and cost up to 2.4x.
STEP_RATIO: dict[str, float] = {
    "bn": 1.00, "l2bn": 0.98, "ln": 0.97, "in": 0.93, "gn-cpg4": 0.93, "gn-cpg8": 0.93, "sn": 1.99, "bcn": 1.80,
    "bin": 1.97, "lnbn": 1.25, "inbn": 1.23, "pnbn": 2.28, "ubn": 2.38,
}


@dataclass(frozen=True)
class Grid:
    """One comparison grid of a study: the row label, its folder under the study's, norms and placement; and
    what it changes from the study's set-up: ``recipe`` values (e.g. batch size and learning rate), the training
    subset, a long-tail ``imbalance`` or ``label_noise`` (:class:`~l2bn.train.config.TrainConfig`)."""

    label: str
    folder: str
    norms: tuple[str, ...]
    placement: str = "all"
    recipe: tuple[tuple[str, Any], ...] = ()
    train_subset: int | None = None
    imbalance: float | None = None
    label_noise: float = 0.0


@dataclass(frozen=True)
class StudyOverrides:
    """Smaller versions of a study (for miniatures and tests): ``None`` keeps the study's value; ``only``
    keeps the grids or norms of those names (norms of a one-grid study, placements of the placement study)."""

    epochs: int | None = None
    train_subset: int | None = None
    seeds: tuple[int, ...] | None = None
    only: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "train_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the study's own), got {value}")

    def flags(self) -> list[str]:
        """The command-line flags that give these overrides."""
        out = []
        for flag, value in (("--epochs", self.epochs), ("--train-subset", self.train_subset)):
            if value is not None:
                out += [flag, str(value)]
        if self.seeds is not None:
            out += ["--seeds", ",".join(map(str, self.seeds))]
        if self.only is not None:
            out += ["--only", ",".join(self.only)]
        return out


@dataclass(frozen=True)
class Study:
    """A study of the paper's tables: its grids, seeds, epochs and training subset, and what it reproduces.

    ``runs_of`` names another study whose run folders this one reads instead of training its own (the
    curves of Figures 1, 6 and 7 are those of the Table 1 study). ``baseline`` is the row every other row is
    tested against. ``recipe_values`` and ``config_values`` set fields of every run's recipe and
    :class:`~l2bn.train.config.TrainConfig` (e.g. :data:`FAST_PATH`).
    """

    name: str
    title: str
    reproduces: str
    grids: tuple[Grid, ...]
    seeds: tuple[int, ...]
    epochs: int
    train_subset: int | None
    metrics_every: int
    baseline: str
    runs_of: str | None = None
    val_size: int | None = None
    recipe_values: tuple[tuple[str, Any], ...] = ()
    config_values: tuple[tuple[str, Any], ...] = ()
    notes: str = ""

    @property
    def folder(self) -> str:
        """The folder (under the results root) holding the run folders this study reads."""
        return self.runs_of or self.name

    def apply(self, overrides: StudyOverrides | None) -> "Study":
        """This study with ``overrides`` applied (a miniature); unknown ``only`` names are refused."""
        if overrides is None:
            return self
        grids = self.grids
        if overrides.only is not None:
            grids = _keep(self, overrides.only)
        epochs = self.epochs if overrides.epochs is None else overrides.epochs
        subset = overrides.train_subset
        if subset is not None:  # a smaller subset for every grid; the validation split keeps its share
            grids = tuple(dataclasses.replace(g, train_subset=None) for g in grids)
        return dataclasses.replace(
            self, grids=grids, epochs=epochs, seeds=tuple(overrides.seeds or self.seeds),
            train_subset=subset if subset is not None else self.train_subset,
            metrics_every=min(self.metrics_every, epochs),
            val_size=(max(10, self.val_size * subset // (self.train_subset or 60_000))
                      if subset is not None and self.val_size else self.val_size),
        )

    def recipe(self, grid: Grid | None = None) -> Recipe:
        """The study's recipe (``fashion-mnist-quick`` with its epochs, seeds and values), with ``grid``'s values."""
        recipe = get_recipe(RECIPE, epochs=self.epochs, metrics_every=self.metrics_every, seeds=self.seeds)
        return dataclasses.replace(recipe, **dict(self.recipe_values), **dict(grid.recipe if grid else ()))

    def config(self, grid: Grid, *, data_dir: str | None = None, progress: bool | None = None) -> TrainConfig:
        """The :class:`TrainConfig` of ``grid`` (norm and seed are set per run by ``compare``), one thread a run."""
        return TrainConfig(dataset=DATASET, model=MODEL, norm=grid.norms[0], recipe=self.recipe(grid),
                           placement=grid.placement, train_subset=grid.train_subset or self.train_subset,
                           data_dir=data_dir, device="cpu", threads=THREADS_PER_RUN, progress=progress,
                           val_size=self.val_size, imbalance=grid.imbalance, label_noise=grid.label_noise,
                           **dict(self.config_values))

    def run_count(self) -> int:
        return sum(len(g.norms) for g in self.grids) * len(self.seeds)


# The runner's fastest measured eager path on this machine (docs/performance.md, "Training throughput"):
# whole-batch crop and flip and channels_last tensors, 1.24x (L2BN) to 1.43x (BN) the training images/s of the
# per-sample DataLoader in NCHW at one thread. Both are identity fields: other augmentation draws (same
# distribution), other convolution summation order. The studies defined after it was measured use it.
FAST_PATH: tuple[tuple[str, Any], ...] = (("augment", "batched"), ("channels_last", True))


def _keep(study: Study, names: Sequence[str]) -> tuple[Grid, ...]:
    """The grids named in ``names`` (all when none is), keeping only the norms named (all when none is)."""
    labels = [g.label for g in study.grids]
    norms = list(dict.fromkeys(n for g in study.grids for n in g.norms))
    unknown = [n for n in names if n not in labels and n not in norms]
    if unknown:
        what = "norm" if len(study.grids) == 1 else "grid or norm"
        known = norms if len(study.grids) == 1 else labels + norms
        raise ValueError(f"study {study.name!r} has no {what} {unknown[0]!r}; it has: {', '.join(known)}")
    grids = [g for g in study.grids if g.label in names] or list(study.grids)
    wanted = [n for n in names if n in norms and n not in labels]
    if wanted:
        grids = [dataclasses.replace(g, norms=tuple(n for n in g.norms if n in wanted)) for g in grids]
    return tuple(g for g in grids if g.norms)


_TABLE1 = Study(
    name="table1", title="Table 1 on Fashion-MNIST: BN vs L2BN, ResNet-20, five seeds, full training set",
    reproduces="Table 1 (CIFAR-100 accuracy, intra/inter angles and IIR of BN vs L2BN)",
    grids=(Grid("all", "", ("bn", "l2bn")),), seeds=PAPER_SEEDS, epochs=10, train_subset=None,
    metrics_every=1, baseline="bn",
)
STUDIES: dict[str, Study] = {
    "table1": _TABLE1,
    "norms": Study(
        name="norms", title="Tables 3 and 5 on Fashion-MNIST: the normalization zoo, ResNet-20, three seeds",
        reproduces="Tables 3 and 5 (L2BN against other normalizations)",
        grids=(Grid("all", "", ZOO),), seeds=PAPER_SEEDS[:3], epochs=5, train_subset=5_000,
        metrics_every=5, baseline="bn",
    ),
    "placement": Study(
        name="placement", title="Table 4 on Fashion-MNIST: where L2BN replaces BN, ResNet-20, three seeds",
        reproduces="Table 4 (L2BN in some parts of the network, BN elsewhere)",
        grids=tuple(Grid(p, p, ("l2bn",), placement=p) for p in PLACEMENTS), seeds=PAPER_SEEDS[:3], epochs=5,
        train_subset=5_000, metrics_every=5, baseline="none",
    ),
    "curves": dataclasses.replace(
        _TABLE1, name="curves", title="Figures 1, 6 and 7 on Fashion-MNIST: the training curves of the Table 1 study",
        reproduces="Figures 1, 6 and 7 (accuracy, loss and angles over training)", runs_of="table1",
    ),
    "converged": Study(
        name="converged", title="BN vs L2BN trained to fit their data: ResNet-20, ten seeds, 40 epochs",
        reproduces="Table 1 (accuracy, intra/inter angles and IIR of BN vs L2BN) with networks that fit their "
                   "training data",
        grids=(Grid("all", "", ("bn", "l2bn")),), seeds=tuple(range(121, 131)), epochs=40, train_subset=6_000,
        val_size=1_000, metrics_every=10, baseline="bn", recipe_values=(("metrics_max_batches", None),),
        notes="5000 training images (a stratified 6000-image subset less a stratified 1000-image validation "
              "split that selects the reported epoch); angles of the final model on all 5000 training images.",
    ),
    "smallbatch": Study(
        name="smallbatch", title="Small batches: BN, L2BN and GN at batch 8, 16 and 128, ResNet-20, five seeds",
        reproduces="premise that BN's batch statistics are the problem, as batch noise grows "
                   "(not a table of the paper)",
        grids=tuple(Grid(f"batch {b}", f"b{b}", ("bn", "l2bn", "gn-cpg4"),
                         recipe=(("batch_size", b), ("lr", 0.1 * b / 128))) for b in (128, 16, 8)),
        seeds=PAPER_SEEDS, epochs=10, train_subset=6_000, val_size=1_000, metrics_every=10, baseline="bn",
        recipe_values=(("metrics_max_batches", None),), config_values=FAST_PATH,
        notes="Learning rate scaled linearly with the batch (0.1 · B/128; Goyal et al. 2017), the same 10 epochs "
              "(the same images seen) at every batch size; whole-batch augmentation and channels_last tensors.",
    ),
    "mechanism": Study(
        name="mechanism", title="Where sample norms differ most: BN vs L2BN on long-tailed and noisy-label data",
        reproduces="mechanism (section 3: unequal per-sample norms hurt BN), with the norm spread "
                   "at every norm layer",
        grids=(Grid("imbalance 100:1", "imbalance", ("bn", "l2bn"), train_subset=20_000, imbalance=100.0),
               Grid("30 % label noise", "noise", ("bn", "l2bn"), label_noise=0.3)),
        seeds=PAPER_SEEDS, epochs=20, train_subset=6_000, val_size=1_000, metrics_every=5, baseline="bn",
        recipe_values=(("metrics_max_batches", None), ("norm_spread", True)), config_values=FAST_PATH,
        notes="Whole-batch augmentation and channels_last tensors. Imbalance: from a 20000-image subset less the validation split, class c keeps 1900·100^(−c/9) "
              "images (Cao et al. 2019); noise: 30 % of the 5000 training labels flipped to another class "
              "(the angle pass uses the true labels). Validation splits are balanced and clean.",
    ),
}


def estimate_seconds(study: Study) -> float:
    """Machine time of ``study`` from :data:`EPOCH_SECONDS`: training scales with the training-set size (the
    full-set rate), every epoch has the test pass, the epochs that measure the angles add the train-side pass
    (at most ``metrics_max_batches`` evaluation batches of 256), and each norm costs :data:`STEP_RATIO` times
    BN. A study that reuses another's runs costs nothing."""
    if study.runs_of:
        return 0.0
    size, train, evaluation = EPOCH_SECONDS["full set"]
    images = (study.train_subset or size) - (study.val_size or 0)
    measured = study.epochs // study.metrics_every + (study.epochs % study.metrics_every != 0)
    cap = study.recipe().metrics_max_batches
    centers = images if cap is None else min(images, cap * 256)  # the train-side pass: at most this many images
    per_image = (evaluation - TEST_PASS_SECONDS) / 10_240  # the basis measured 40 batches of 256
    validation = TEST_PASS_SECONDS * (study.val_size or 0) / 10_000
    per_run = (study.epochs * (train * images / size + TEST_PASS_SECONDS + validation)
               + measured * per_image * centers)
    runs = sum(STEP_RATIO.get(norm, 1.0) if grid.placement == "all" else 1.0 for grid in study.grids
               for norm in grid.norms)
    return len(study.seeds) * runs * per_run


def list_studies() -> list[str]:
    return list(STUDIES)


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; known studies: {', '.join(STUDIES)}")
    return STUDIES[name]
