"""The training loop: one run of (dataset, model, norm, seed, recipe) with checkpoints, resume and metrics.

Split the way torchvision's ``references/classification/train.py`` is: :func:`setup` (data, model,
optimiser, loaders, resume), :func:`train_one_epoch`, :func:`evaluate` (test loss/accuracy and the paper's
angle metrics of the classifier-input features, supplementary A), :func:`save_checkpoint` and
:func:`write_summary`; :func:`train` is the epoch loop over them. Every file goes through
:class:`~l2bn.train.rundir.RunDir`.

Angle metrics, every ``recipe.metrics_every`` epochs and at the last one: intra-angle of the training data
against train centers, intra-angle of the test data against the same train centers, inter-angle of the
train centers, IIR train = intra_train / inter and IIR test = intra_test / inter.

Reproducibility: the global RNG and the shuffling generators are re-seeded from (seed, epoch) at the start
of every epoch, and the model, optimiser, scheduler and scaler states are checkpointed after every epoch,
so a resumed run continues bit-for-bit like an uninterrupted one on a deterministic device (CPU), with any
``workers``: the training loader's worker processes, which draw the augmentation, start afresh each epoch
seeded from that epoch's loader generator (the evaluation loaders, which draw nothing, keep theirs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from ..convert import BN_TO_L2BN, swap_modules
from ..data import DataBundle, build_data
from ..norms.unified import condensation_summary
from .ddp import DistEnv, all_reduce_sum, barrier, cleanup_distributed, resolve_device, setup_distributed
from .recipes import Recipe, default_recipe_name, get_recipe, warm_restart_factor
from .rundir import ANGLE_KEYS, DEVICE_KEYS, EPOCH_KEYS, NORM_STATE_KEYS, RunBusyError, RunDir

__all__ = [
    "IDENTITY_FIELDS",
    "NonFiniteLossError",
    "TrainConfig",
    "analyze_checkpoint",
    "build_model",
    "evaluate",
    "is_complete",
    "lr_factor",
    "train",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ModelFn = Callable[..., nn.Module]
# Config fields that define the experiment: resuming with any of them changed is refused, and a finished
# run counts as done for a grid only if they all match.
IDENTITY_FIELDS = ("dataset", "model", "norm", "seed", "recipe", "placement", "train_subset", "model_kwargs", "amp",
                   "channels_last")
ABSURD_LOSS_FACTOR = 1e6  # a finite loss this many times the first epoch's warns (once a run)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message and ``failure`` name the run, epoch and step."""

    def __init__(self, message: str, failure: dict[str, Any]) -> None:
        super().__init__(message)
        self.failure = failure


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


@dataclass
class TrainConfig:
    """Everything one run needs; ``recipe`` defaults to the preset for (dataset, model family).

    ``placement`` puts the norm into named model parts only (the paper's Table 4); ``train_subset=N`` trains
    on a stratified N-sample subset of the training set (the same one for every seed and norm).
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


def check_device(device: str) -> torch.device:
    """The device ``device`` names, if it exists on this machine; else ``ValueError`` naming what is accepted."""
    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps ({exc})") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} is not available: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not available on this machine; use 'cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported; accepted: auto, cpu, cuda, cuda:N, mps")
    return dev


def check_out_dir(out: str | os.PathLike) -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be written — before any work."""
    path = Path(out).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is" if existing == path else f"lies under {existing}, which is"
        raise ValueError(f"--out {out} {where} a file; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is read-only; pass a writable folder")


# ------------------------------------------------------------------------------------------------ pieces
def lr_factor(recipe: Recipe, epoch_progress: float) -> float:
    """Multiplier of ``recipe.lr`` after ``epoch_progress`` epochs (fractional: the schedule steps per batch).

    Linear warm-up over ``warmup_epochs``; then cosine to 0 at ``epochs``, or ``gamma`` per passed milestone,
    or cosine cycles with warm restarts (:func:`~l2bn.train.recipes.warm_restart_factor`).
    """
    t = epoch_progress
    if t < recipe.warmup_epochs:
        return (t + 1e-8) / recipe.warmup_epochs
    if recipe.schedule == "cosine-restarts":
        return warm_restart_factor(recipe, t - recipe.warmup_epochs)
    if recipe.schedule == "cosine":
        span = recipe.epochs - recipe.warmup_epochs
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - recipe.warmup_epochs) / span)))
    if recipe.schedule == "step":
        return recipe.gamma ** sum(1 for m in recipe.milestones if math.floor(t + 1e-9) >= m)
    return 1.0


def build_model(name: str, *, num_classes: int, in_channels: int, norm: str, **kwargs) -> nn.Module:
    """``l2bn.models.create_model`` with the norm resolved by name through the norm registry."""
    from ..models import create_model

    return create_model(name, num_classes=num_classes, in_channels=in_channels, norm_layer=norm, **kwargs)


_PLAIN_BN = tuple(BN_TO_L2BN)  # exactly nn.BatchNorm{1,2,3}d, the classes the converters know


def _convert_plain_bn_to_sync(module: nn.Module, process_group=None) -> nn.Module:
    """torch SyncBatchNorm for exactly ``nn.BatchNorm{1,2,3}d`` (torch's own converter would also swallow
    L2BN and other ``_BatchNorm`` subclasses)."""
    return swap_modules(module, lambda name, m: nn.SyncBatchNorm.convert_sync_batchnorm(m, process_group)
                        if type(m) in _PLAIN_BN else None)


def _sync_norms(model: nn.Module, device: torch.device) -> nn.Module:
    from .. import distributed as l2dist

    model = l2dist.convert_sync_l2bn(model)
    plain = [n for n, m in model.named_modules() if type(m) in _PLAIN_BN]
    if plain:
        if device.type != "cuda":
            raise ValueError(
                f"--sync-bn: torch's SyncBatchNorm (for plain BN layers such as {plain[0]!r}) needs CUDA, got "
                f"device {device}; L2BN layers synchronise on any backend"
            )
        model = _convert_plain_bn_to_sync(model)
    return model


def _param_groups(model: nn.Module, recipe: Recipe) -> list[dict] | Any:
    """The norm zoo's parameter groups (e.g. BIN gates without weight decay) when it provides them, or
    weight decay on convolution weights only (``weight_decay_scope="conv"``)."""
    if recipe.weight_decay_scope == "conv":
        return conv_weight_decay_groups(model, recipe.weight_decay)
    try:
        from ..norms import param_groups
    except ImportError:
        return model.parameters()
    return param_groups(model, recipe.lr, recipe.weight_decay)


def conv_weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two SGD groups: convolution weights with ``weight_decay``, every other parameter without (the Keras
    references' ``kernel_regularizer=l2(c)`` on convolutions: a penalty c·Σw² is weight decay 2c)."""
    conv = [m.weight for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    chosen = {id(p) for p in conv}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [{"params": conv, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _gate_clipper(model: nn.Module) -> Callable[[], None]:
    try:
        from ..norms import clip_gates_
    except ImportError:
        return lambda: None
    return lambda: clip_gates_(model)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def _shard(dataset: Dataset, env: DistEnv) -> Dataset:
    """Every ``world_size``-th sample from ``rank``: disjoint shards that cover the set exactly once."""
    if not env.distributed:
        return dataset
    return Subset(dataset, range(env.rank, len(dataset), env.world_size))


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device, persistent: bool = True,
            **kw) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        **kw,
    )


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    test_loader: DataLoader,
    train_loader: DataLoader | None = None,
    *,
    num_classes: int,
    device: torch.device,
    amp: str | None = None,
    channels_last: bool = False,
    max_batches: int | None = None,
    feature_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Test loss/accuracy and, with ``train_loader``, the angle metrics (summed over ranks under DDP).

    The train pass (at most ``max_batches`` batches a rank) gives the class centers and intra(train); the
    test pass (always complete) gives accuracy and intra(test) against those train centers.
    ``feature_model`` is the unwrapped module whose classifier input is captured (its ``feature_layer``'s
    input, else its last ``nn.Linear``'s). A test set with ``devices`` also gets ``test_confusion`` per device
    (:mod:`l2bn.train.confusion`).
    """
    from ..metrics import AngleAccumulator, FeatureHook, IntraAngleAccumulator
    from .confusion import ConfusionByGroup, device_groups

    groups = device_groups(test_loader.dataset)
    confusion = ConfusionByGroup(*groups, num_classes, device) if groups is not None else None
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()
    hook = FeatureHook(feature_model or _unwrap(model)) if train_loader is not None else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def forward(x: Tensor) -> Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast:
            return model(x).float()

    result: dict[str, float] = {}
    try:
        if hook is not None:
            hook.__enter__()
            stored: list[tuple[Tensor, Tensor]] = []
            for i, (x, y) in enumerate(train_loader):
                if max_batches is not None and i >= max_batches:
                    break
                forward(x)
                stored.append((hook.features.float(), y.to(device)))
            dim = torch.tensor([stored[0][0].shape[1] if stored else 0], device=device)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
            centers_acc = AngleAccumulator(num_classes, dim=int(dim), device=device)
            for f, y in stored:
                centers_acc.update(f, y)
            centers_acc.all_reduce()
            centers = centers_acc.centers()
            intra_train = IntraAngleAccumulator(centers, device=device)
            for f, y in stored:
                intra_train.update(f, y)
            intra_train.all_reduce()
            del stored
            intra_test = IntraAngleAccumulator(centers, device=device)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        for x, y in test_loader:
            y = y.to(device, non_blocking=True)
            logits = forward(x)
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += y.numel()
            if confusion is not None:
                confusion.update(logits.argmax(1), y)
            if hook is not None:
                intra_test.update(hook.features.float(), y)
        all_reduce_sum(sums)
        result["test_loss"] = float(sums[0] / sums[2])
        result["test_acc"] = float(100.0 * sums[1] / sums[2])
        if confusion is not None:
            result["test_confusion"] = confusion.record()
        if hook is not None:
            intra_test.all_reduce()
            result.update(_angle_metrics(intra_train, intra_test))
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return result




def _angle_metrics(intra_train, intra_test) -> dict[str, float]:
    """The five angle metrics; NaN with a warning where they are undefined (e.g. features collapsed to zero)."""
    try:
        train_stats, test_stats = intra_train.compute(), intra_test.compute()
        values = (train_stats.intra, test_stats.intra, train_stats.inter, train_stats.iir,
                  test_stats.intra / train_stats.inter)
    except (ValueError, ZeroDivisionError) as exc:
        warnings.warn(f"angle metrics undefined, logged as NaN: {exc}", RuntimeWarning, stacklevel=3)
        values = (math.nan,) * len(ANGLE_KEYS)
    return dict(zip(ANGLE_KEYS, values))
# ------------------------------------------------------------------------------------------------ training
def is_complete(out: str | os.PathLike, config: TrainConfig | None = None) -> bool:
    """Whether ``out`` holds a finished run, of the same experiment if ``config`` is given."""
    return RunDir(out).is_complete(config.identity() if config is not None else None)


def _check_resume(saved: dict, config: TrainConfig, path: Path) -> None:
    theirs, mine = TrainConfig.from_dict(saved).identity(), config.identity()
    diff = [k for k in IDENTITY_FIELDS if theirs[k] != mine[k]]
    if diff:
        details = "; ".join(f"{k}: checkpoint {theirs[k]!r} vs now {mine[k]!r}" for k in diff)
        raise ValueError(f"cannot resume {path}: the experiment changed ({details})")


def _impl_setting() -> str:
    from ..functional import IMPL_ENV_VAR

    return os.environ.get(IMPL_ENV_VAR) or "auto"


@dataclass
class RunState:
    """What :func:`setup` builds for one run and the epoch functions share."""

    config: TrainConfig
    env: DistEnv
    run: RunDir
    data: DataBundle
    net: nn.Module  # the bare model (its state is checkpointed)
    model: nn.Module  # what is called: ``net``, possibly wrapped in DDP and compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    test_loader: DataLoader
    train_eval_loader: DataLoader
    shuffle_generators: tuple[torch.Generator, torch.Generator]
    steps_per_epoch: int
    say: Callable[[str], None]
    start_epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    first_loss: float | None = None
    warned_absurd_loss: bool = False


def _prepare_data(config: TrainConfig, data: DataBundle | None, env: DistEnv) -> DataBundle:
    from ..data.subset import stratified_subset

    data = data or build_data(config.dataset, config.data_dir, download=config.download and env.is_main)
    if config.recipe.spec_masks:
        from ..data.audio import with_spec_masks

        data = with_spec_masks(data)
    if config.train_subset is not None:
        train, train_eval = stratified_subset((data.train, data.train_eval), config.train_subset)
        data = dataclasses.replace(data, train=train, train_eval=train_eval)
    return data


def setup(config: TrainConfig, env: DistEnv, run: RunDir, model_fn: ModelFn | None, data: DataBundle | None,
          say: Callable[[str], None]) -> RunState:
    """Data, model, optimiser, schedule and loaders of a run (nothing is written: the folder may not exist yet)."""
    recipe, device = config.recipe, env.device
    if recipe.batch_size % env.world_size:
        raise ValueError(f"batch size {recipe.batch_size} is not divisible by the world size {env.world_size}")
    local_batch = recipe.batch_size // env.world_size
    data = _prepare_data(config, data, env)
    if len(data.train) < recipe.batch_size:
        raise ValueError(f"batch size {recipe.batch_size} exceeds the {len(data.train)} training samples")
    torch.manual_seed(config.seed)
    make = model_fn or (lambda **kw: build_model(config.model, **kw, placement=config.placement, **config.model_kwargs))
    net = make(num_classes=data.num_classes, in_channels=data.in_channels, norm=config.norm)
    if env.distributed and config.sync_bn:
        net = _sync_norms(net, device)
    net.to(device)
    if config.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(_param_groups(net, recipe), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    steps_per_epoch = len(data.train) // recipe.batch_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(recipe, step / steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")

    generators = (torch.Generator(), torch.Generator())  # sample order, loader base seed: re-seeded every epoch
    if env.distributed:
        sampler = DistributedSampler(data.train, env.world_size, env.rank, shuffle=True, seed=0, drop_last=True)
    else:
        sampler = RandomSampler(data.train, generator=generators[0])
    eval_batch = max(local_batch, 256)
    model: nn.Module = net
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    state = RunState(
        config, env, run, data, net, model, optimizer, scheduler, scaler,
        # not persistent: each epoch's workers take their RNG seeds from generators[1], re-seeded per epoch
        train_loader=_loader(data.train, local_batch, config.workers, device, persistent=False, sampler=sampler,
                             drop_last=True, generator=generators[1]),
        test_loader=_loader(_shard(data.test, env), eval_batch, config.workers, device),
        train_eval_loader=_loader(_shard(data.train_eval, env), eval_batch, config.workers, device),
        shuffle_generators=generators, steps_per_epoch=steps_per_epoch, say=say,
    )
    return state


def _restore(state: RunState) -> None:
    """Load ``last.pt`` into the state (same experiment only); drop log lines of epochs it did not save."""
    run, config = state.run, state.config
    ckpt = run.load_checkpoint(run.last_path, map_location=state.env.device, for_resume=True)
    _check_resume(ckpt["config"], config, run.last_path)
    if ckpt.get("l2bn_impl", "auto") != _impl_setting():
        warnings.warn(f"resuming {run.path} with L2BN_IMPL={_impl_setting()!r}, but it started with "
                      f"{ckpt.get('l2bn_impl', 'auto')!r}: the records will not be byte-identical to an "
                      "uninterrupted run", RuntimeWarning, stacklevel=2)
    state.net.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.start_epoch, state.best_acc, state.best_epoch = ckpt["epoch"], ckpt["best_acc"], ckpt["best_epoch"]
    state.say(f"resuming {run.path} after epoch {state.start_epoch}")
    if state.env.is_main:
        run.keep_epochs(state.start_epoch)
        records = run.read_records()
        state.first_loss = records[0]["train_loss"] if records else None


def _forward_loss(state: RunState, x: Tensor, y: Tensor, criterion: nn.Module, mixup) -> tuple[Tensor, Tensor]:
    if mixup is None:
        logits = state.model(x)
        return logits, criterion(logits, y)
    if state.config.recipe.mixup_per_sample:
        return _mixup_per_sample(state.model, x, y, criterion, mixup)
    lam = float(mixup.sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    logits = state.model(lam * x + (1.0 - lam) * x[perm])
    return logits, lam * criterion(logits, y) + (1.0 - lam) * criterion(logits, y[perm])


def _mixup_per_sample(model: nn.Module, x: Tensor, y: Tensor, criterion: nn.Module, mixup) -> tuple[Tensor, Tensor]:
    """Mixup with one λ per sample (Hu et al.'s generator): x_i ← λ_i x_i + (1 − λ_i) x_π(i) and the loss
    λ_i CE(y_i) + (1 − λ_i) CE(y_π(i)) averaged over the batch (cross-entropy with the mixed one-hot labels)."""
    lam = mixup.sample((x.shape[0],)).to(x.device)
    perm = torch.randperm(x.shape[0], device=x.device)
    mixed = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    logits = model(mixed * x + (1.0 - mixed) * x[perm])
    per_sample = criterion.__class__(reduction="none", label_smoothing=criterion.label_smoothing)
    loss = lam * per_sample(logits, y) + (1.0 - lam) * per_sample(logits, y[perm])
    return logits, loss.mean()


def train_one_epoch(state: RunState, epoch: int, progress: bool) -> dict[str, float]:
    """One pass over the training set; returns the loss/accuracy (global over ranks), images and seconds."""
    config, env, recipe, device = state.config, state.env, state.config.recipe, state.env.device
    shuffle_seed = _epoch_seed(config.seed, epoch)
    torch.manual_seed(shuffle_seed + env.rank)
    state.shuffle_generators[0].manual_seed(shuffle_seed)
    state.shuffle_generators[1].manual_seed(shuffle_seed + 1 + env.rank)
    if isinstance(state.train_loader.sampler, DistributedSampler):
        state.train_loader.sampler.set_epoch(shuffle_seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    mixup = torch.distributions.Beta(recipe.mixup_alpha, recipe.mixup_alpha) if recipe.mixup_alpha > 0 else None
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[config.amp]) if config.amp else contextlib.nullcontext()
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    clip_gates = _gate_clipper(state.net)
    state.model.train()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (global over ranks)
    start = time.perf_counter()
    bar = tqdm(total=state.steps_per_epoch * recipe.batch_size, unit="img", unit_scale=True, disable=not progress,
               desc=f"{config.norm} s{config.seed} epoch {epoch}/{recipe.epochs}", leave=False, file=sys.stderr)
    for step, (x, y) in enumerate(state.train_loader, start=1):
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with autocast:
            logits, loss = _forward_loss(state, x, y, criterion, mixup)
        stats = torch.stack([loss.detach().double() * y.numel(), (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
        stats = all_reduce_sum(stats).cpu()
        if not math.isfinite(float(stats[0])):
            bar.close()
            raise _diverged(state, epoch, step, float(stats[0] / stats[2]))
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        clip_gates()
        sums += stats
        bar.update(int(stats[2]))
        if step % 10 == 0 or step == state.steps_per_epoch:
            bar.set_postfix(loss=f"{float(sums[0] / sums[2]):.4f}", lr=f"{state.scheduler.get_last_lr()[0]:.4g}")
    bar.close()
    return {"train_loss": float(sums[0] / sums[2]), "train_acc": float(100.0 * sums[1] / sums[2]),
            "images": float(sums[2]), "seconds": time.perf_counter() - start}


def _diverged(state: RunState, epoch: int, step: int, loss: float) -> NonFiniteLossError:
    config = state.config
    kept = (f"the last good checkpoint is {state.run.last_path} (epoch {epoch - 1})" if epoch > 1
            else "no checkpoint was written yet")
    failure = {"norm": config.norm, "seed": config.seed, "epoch": epoch, "step": step,
               "reason": f"non-finite training loss ({loss})"}
    return NonFiniteLossError(
        f"[{config.norm} seed {config.seed}] non-finite training loss ({loss}) at epoch {epoch}, step {step} of "
        f"{state.steps_per_epoch}; training stopped, {kept}", failure)


def _check_loss(state: RunState, loss: float) -> None:
    """Warn once a run when a finite loss is absurdly larger than the first epoch's."""
    if state.first_loss is None:
        state.first_loss = loss
    elif not state.warned_absurd_loss and loss > ABSURD_LOSS_FACTOR * max(state.first_loss, 1e-12):
        state.warned_absurd_loss = True
        message = (f"[{state.config.norm} seed {state.config.seed}] training loss {loss:.4g} is over "
                   f"{ABSURD_LOSS_FACTOR:.0e} times the first epoch's ({state.first_loss:.4g}): the run is diverging")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        state.say(f"warning: {message}")


def save_checkpoint(state: RunState, epoch: int, improved: bool) -> None:
    """``best.pt`` (model) when the test accuracy improved, then ``last.pt`` (everything resume needs)."""
    saved = {"model": state.net.state_dict(), "epoch": epoch, "best_acc": state.best_acc,
             "best_epoch": state.best_epoch, "config": state.config.to_dict(), "num_classes": state.data.num_classes,
             "in_channels": state.data.in_channels, "l2bn_impl": _impl_setting()}
    if improved:
        state.run.save_checkpoint(saved, best=True)
    state.run.save_checkpoint({**saved, "optimizer": state.optimizer.state_dict(),
                               "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict()})


def write_summary(state: RunState) -> dict[str, Any]:
    records = state.run.read_records() if state.env.is_main else []
    summary = {"best_test_acc": state.best_acc, "best_epoch": state.best_epoch, "final": records[-1] if records else {},
               "epochs": state.config.recipe.epochs, "world_size": state.env.world_size,
               "config": state.config.to_dict()}
    if state.env.is_main:
        state.run.write_summary(summary)
    return summary


def _run_epoch(state: RunState, epoch: int, progress: bool) -> dict[str, Any]:
    """Train one epoch, evaluate, log and checkpoint it; returns the logged record."""
    config, recipe = state.config, state.config.recipe
    trained = train_one_epoch(state, epoch, progress)
    start = time.perf_counter()
    measure = epoch % recipe.metrics_every == 0 or epoch == recipe.epochs
    record: dict[str, Any] = {"epoch": epoch, "lr": state.optimizer.param_groups[0]["lr"],
                              "train_loss": trained["train_loss"], "train_acc": trained["train_acc"]}
    record.update(evaluate(
        state.model, state.test_loader, state.train_eval_loader if measure else None,
        num_classes=state.data.num_classes, device=state.env.device, amp=config.amp,
        channels_last=config.channels_last, max_batches=recipe.metrics_max_batches, feature_model=state.net,
    ))
    eval_seconds = time.perf_counter() - start
    record.update(condensation_summary(state.net))
    record = {k: record[k] for k in (*EPOCH_KEYS, *ANGLE_KEYS, *NORM_STATE_KEYS, *DEVICE_KEYS) if k in record}
    _check_loss(state, record["train_loss"])
    improved = record["test_acc"] > state.best_acc
    if improved:
        state.best_acc, state.best_epoch = record["test_acc"], epoch
    if state.env.is_main:
        state.run.append_record(record)
        state.run.append_timing({"epoch": epoch, "train_seconds": trained["seconds"], "eval_seconds": eval_seconds,
                                 "train_images_per_second": trained["images"] / trained["seconds"]})
        save_checkpoint(state, epoch, improved)
    barrier()
    angles = (f" intra {record['intra_train']:.2f}/{record['intra_test']:.2f} inter {record['inter']:.2f} "
              f"IIR {record['iir_train']:.3f}/{record['iir_test']:.3f}") if measure else ""
    gate = (f" UBN m {record['ubn_condensation']:.3f} gated {record['ubn_gated']:.0%}"
            if "ubn_gated" in record else "")
    state.say(f"[{config.dataset} {config.model} {config.norm} seed {config.seed}] epoch {epoch}/{recipe.epochs} "
              f"loss {record['train_loss']:.4f} train {record['train_acc']:.2f}% test {record['test_acc']:.2f}%"
              f"{angles}{gate} ({trained['seconds']:.1f}s + {eval_seconds:.1f}s)")
    return record


def train(
    config: TrainConfig,
    *,
    model_fn: ModelFn | None = None,
    data: DataBundle | None = None,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) one training run and return its summary (also written to ``summary.json``).

    ``model_fn(num_classes=, in_channels=, norm=)`` overrides :func:`build_model`; ``data`` overrides
    :func:`l2bn.data.build_data`. ``stop_after=k`` ends the call after epoch k as if the run were killed
    there (for time-sliced jobs; continue with ``resume=True``); the returned dict then has ``stopped_after``.
    A diverged run raises :class:`NonFiniteLossError` after recording ``failed.json``; a folder that another
    process trains raises :class:`~l2bn.train.rundir.RunBusyError`. Under torchrun every rank calls this;
    only rank 0 writes files.
    """
    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    env = setup_distributed(config.device)
    try:
        return _train(config, env, model_fn, data, log, stop_after)
    finally:
        cleanup_distributed(env)


@contextlib.contextmanager
def _locked(run: RunDir, env: DistEnv) -> Iterator[None]:
    """Rank 0 holds the run folder's lock; if another process has it, every rank raises (none waits forever)."""
    with contextlib.ExitStack() as stack:
        busy = torch.zeros(1, device=env.device)
        if env.is_main:
            try:
                stack.enter_context(run.lock())
            except RunBusyError as exc:
                busy += 1
                error = exc
        if float(all_reduce_sum(busy)):
            raise error if env.is_main else RunBusyError(f"{run.path} is being trained by another process")
        yield


def _train(config: TrainConfig, env: DistEnv, model_fn: ModelFn | None, data: DataBundle | None, log,
           stop_after: int | None) -> dict[str, Any]:
    run = RunDir(config.out)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say = log if env.is_main else (lambda msg: None)
    state = setup(config, env, run, model_fn, data, say)  # before any folder exists: a failure leaves nothing
    if env.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
    barrier()
    with _locked(run, env):
        if not config.resume and run.holds_run():  # every rank, so none waits forever
            raise FileExistsError(f"{run.path} already holds a run; pass --resume to continue it or choose another "
                                  "--out")
        if env.is_main:
            run.remove_stale_temporaries()
        if config.resume and run.last_path.is_file():
            _restore(state)
        if env.is_main:
            if state.start_epoch == 0:
                run.clear_logs()
            run.clear_failure()
            run.write_config({**config.to_dict(), "world_size": env.world_size})
        barrier()
        progress = (sys.stderr.isatty() if config.progress is None else config.progress) and env.is_main
        for epoch in range(state.start_epoch + 1, config.recipe.epochs + 1):
            if stop_after is not None and epoch > stop_after:
                return {"stopped_after": epoch - 1, "best_test_acc": state.best_acc, "best_epoch": state.best_epoch}
            try:
                _run_epoch(state, epoch, progress)
            except NonFiniteLossError as exc:
                if env.is_main:
                    run.record_failure(exc.failure)
                raise
        summary = write_summary(state)
    barrier()
    return summary


def analyze_checkpoint(
    path: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    max_batches: int | None = None,
    model_fn: ModelFn | None = None,
    data: DataBundle | None = None,
) -> dict[str, Any]:
    """Test accuracy and angle metrics of a saved model (``last.pt``/``best.pt``, loaded with
    ``weights_only=True``); ``dataset`` defaults to the one it was trained on (and its training subset)."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (or None: every batch), got {max_batches}")
    dev = check_device(device)
    ckpt = RunDir.load_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["config"])
    if dataset is None:
        trained_on = dataclasses.replace(config, data_dir=data_dir or config.data_dir, download=False)
        data = _prepare_data(trained_on, data, DistEnv())
    data = data or build_data(dataset, data_dir, augment=False)
    if data.num_classes != ckpt["num_classes"] or data.in_channels != ckpt["in_channels"]:
        raise ValueError(
            f"{path} was trained for {ckpt['num_classes']} classes / {ckpt['in_channels']} channels, dataset "
            f"{data.name!r} has {data.num_classes} / {data.in_channels}"
        )
    make = model_fn or (lambda **kw: build_model(config.model, **kw, placement=config.placement, **config.model_kwargs))
    net = make(num_classes=data.num_classes, in_channels=data.in_channels, norm=config.norm)
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: its weights do not fit model {config.model!r} with norm {config.norm!r} "
                         f"({str(exc).splitlines()[0]}); was the file edited or taken from another run?") from None
    net.to(dev)
    batch = max(config.recipe.batch_size, 256)
    result = evaluate(
        net, _loader(data.test, batch, 0, dev), _loader(data.train_eval, batch, 0, dev),
        num_classes=data.num_classes, device=dev, max_batches=max_batches,
    )
    return {"checkpoint": str(path), "epoch": ckpt["epoch"], "dataset": data.name, "model": config.model,
            "norm": config.norm, **result}
