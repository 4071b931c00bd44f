"""The training loop: one run of (dataset, model, norm, seed, recipe) with checkpoints, resume and metrics.

A plain loop in the manner of torchvision's ``references/classification/train.py``. Each epoch logs the
training loss/accuracy, test loss/accuracy and — every ``recipe.metrics_every`` epochs and at the last one —
the paper's angle metrics of the classifier-input features (supplementary A): intra-angle of the training
data against train centers, intra-angle of the test data against the same train centers, inter-angle of
the train centers, IIR train = intra_train / inter and IIR test = intra_test / inter.

Reproducibility: the global RNG and the shuffling generator are re-seeded from (seed, epoch) at the start
of every epoch, and the model, optimiser, scheduler and scaler states are checkpointed after every epoch,
so a resumed run continues bit-for-bit like an uninterrupted one on a deterministic device (CPU).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from ..data import DataBundle, build_data
from .ddp import DistEnv, all_reduce_sum, barrier, cleanup_distributed, setup_distributed
from .recipes import Recipe, default_recipe_name, get_recipe

__all__ = [
    "TrainConfig",
    "NonFiniteLossError",
    "train",
    "evaluate",
    "analyze_checkpoint",
    "build_model",
    "lr_factor",
    "is_complete",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ModelFn = Callable[..., nn.Module]
# Config fields that define the experiment: resuming with any of them changed is refused.
_IDENTITY_FIELDS = ("dataset", "model", "norm", "seed", "recipe", "model_kwargs", "amp", "channels_last")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the epoch and step."""


@dataclass
class TrainConfig:
    """Everything one run needs; ``recipe`` defaults to the preset for (dataset, model)."""

    dataset: str = "digits"
    model: str = "resnet20"
    norm: str = "bn"
    seed: int = 121
    out: str = "runs/train"
    recipe: Recipe | None = None
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ------------------------------------------------------------------------------------------------ pieces
def lr_factor(recipe: Recipe, epoch_progress: float) -> float:
    """Multiplier of ``recipe.lr`` after ``epoch_progress`` epochs (fractional: the schedule steps per batch).

    Linear warm-up over ``warmup_epochs``; then cosine to 0 at ``epochs``, or ``gamma`` per passed milestone.
    """
    t = epoch_progress
    if t < recipe.warmup_epochs:
        return (t + 1e-8) / recipe.warmup_epochs
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


def _convert_plain_bn_to_sync(module: nn.Module, process_group=None) -> nn.Module:
    """torch SyncBatchNorm for exactly ``nn.BatchNorm{1,2,3}d`` (torch's own converter would also swallow
    L2BN and other ``_BatchNorm`` subclasses)."""
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        new = _convert_plain_bn_to_sync(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module


def _sync_norms(model: nn.Module, device: torch.device) -> nn.Module:
    from .. import distributed as l2dist

    model = l2dist.convert_sync_l2bn(model)
    plain = [n for n, m in model.named_modules() if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)]
    if plain:
        if device.type != "cuda":
            raise ValueError(
                f"--sync-bn: torch's SyncBatchNorm (for plain BN layers such as {plain[0]!r}) needs CUDA, got "
                f"device {device}; L2BN layers synchronise on any backend"
            )
        model = _convert_plain_bn_to_sync(model)
    return model


def _param_groups(model: nn.Module, recipe: Recipe) -> list[dict] | Any:
    """The norm zoo's parameter groups (e.g. BIN gates without weight decay) when it provides them."""
    try:
        from ..norms import param_groups
    except ImportError:
        return model.parameters()
    return param_groups(model, recipe.lr, recipe.weight_decay)


def _gate_clipper(model: nn.Module) -> Callable[[], None]:
    try:
        from ..norms import clip_gates_
    except ImportError:
        return lambda: None
    return lambda: clip_gates_(model)


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` (never a torn file)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def _shard(dataset: Dataset, env: DistEnv) -> Dataset:
    """Every ``world_size``-th sample from ``rank``: disjoint shards that cover the set exactly once."""
    if not env.distributed:
        return dataset
    return Subset(dataset, range(env.rank, len(dataset), env.world_size))


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device, **kw) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
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
) -> dict[str, float]:
    """Test loss/accuracy and, with ``train_loader``, the angle metrics (summed over ranks under DDP).

    The train pass (at most ``max_batches`` batches a rank) gives the class centers and intra(train); the
    test pass (always complete) gives accuracy and intra(test) against those train centers.
    ``feature_model`` is the unwrapped module whose last ``nn.Linear`` input is captured.
    """
    from ..metrics import AngleAccumulator, FeatureHook, IntraAngleAccumulator

    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else nullcontext()
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
            if hook is not None:
                intra_test.update(hook.features.float(), y)
        all_reduce_sum(sums)
        result["test_loss"] = float(sums[0] / sums[2])
        result["test_acc"] = float(100.0 * sums[1] / sums[2])
        if hook is not None:
            intra_test.all_reduce()
            train_stats, test_stats = intra_train.compute(), intra_test.compute()
            result.update(
                intra_train=train_stats.intra,
                intra_test=test_stats.intra,
                inter=train_stats.inter,
                iir_train=train_stats.iir,
                iir_test=test_stats.intra / train_stats.inter,
            )
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return result


# ------------------------------------------------------------------------------------------------ training
def is_complete(out: str | os.PathLike, config: TrainConfig | None = None) -> bool:
    """Whether ``out`` holds a finished run (``summary.json``), of the same experiment if ``config`` is given."""
    path = Path(out) / "summary.json"
    if not path.is_file():
        return False
    if config is None:
        return True
    saved = json.loads(path.read_text()).get("config", {})
    mine = config.to_dict()
    return all(_jsonable(saved.get(k)) == _jsonable(mine.get(k)) for k in _IDENTITY_FIELDS)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _check_resume(saved: dict, config: TrainConfig, path: Path) -> None:
    mine = config.to_dict()
    diff = [k for k in _IDENTITY_FIELDS if _jsonable(saved.get(k)) != _jsonable(mine.get(k))]
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume {path}: the experiment changed ({details})")


def _truncate_jsonl(path: Path, keep_epochs: int) -> None:
    """Keep the records of epochs 1..keep_epochs (a killed run may have logged an epoch it did not save)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= keep_epochs]
    _atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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
    Under torchrun every rank calls this; only rank 0 writes files.
    """
    env = setup_distributed(config.device)
    try:
        return _train(config, env, model_fn, data, log, stop_after)
    finally:
        cleanup_distributed(env)


def _train(
    config: TrainConfig, env: DistEnv, model_fn: ModelFn | None, data: DataBundle | None, log, stop_after: int | None
) -> dict[str, Any]:
    recipe, device = config.recipe, env.device
    out = Path(config.out)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say = log if env.is_main else (lambda msg: None)
    last_path, best_path = out / "last.pt", out / "best.pt"
    metrics_path, timing_path = out / "metrics.jsonl", out / "timing.jsonl"

    if not config.resume and (metrics_path.exists() or last_path.exists()):  # every rank, so none waits forever
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if recipe.batch_size % env.world_size:
        raise ValueError(f"batch size {recipe.batch_size} is not divisible by the world size {env.world_size}")
    local_batch = recipe.batch_size // env.world_size

    data = data or build_data(config.dataset, config.data_dir, download=config.download and env.is_main)
    torch.manual_seed(config.seed)
    make = model_fn or (lambda **kw: build_model(config.model, **kw, **config.model_kwargs))
    net = make(num_classes=data.num_classes, in_channels=data.in_channels, norm=config.norm)
    if env.distributed and config.sync_bn:
        net = _sync_norms(net, device)
    net.to(device)
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:
        net.to(memory_format=torch.channels_last)

    optimizer = torch.optim.SGD(
        _param_groups(net, recipe),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )
    train_set = data.train
    if len(train_set) < local_batch * env.world_size:
        raise ValueError(f"batch size {recipe.batch_size} exceeds the {len(train_set)} training samples")
    steps_per_epoch = len(train_set) // (local_batch * env.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(recipe, step / steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    clip_gates = _gate_clipper(net)

    start_epoch, best_acc, best_epoch = 0, -1.0, 0
    if config.resume and last_path.is_file():
        ckpt = torch.load(last_path, map_location=device, weights_only=False)
        _check_resume(ckpt["config"], config, last_path)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_acc, best_epoch = ckpt["epoch"], ckpt["best_acc"], ckpt["best_epoch"]
        say(f"resuming {out} after epoch {start_epoch}")
        if env.is_main:
            _truncate_jsonl(metrics_path, start_epoch)
            _truncate_jsonl(timing_path, start_epoch)
    elif env.is_main:
        for p in (metrics_path, timing_path):
            p.unlink(missing_ok=True)
    if env.is_main:
        _atomic_write_text(out / "config.json", json.dumps({**config.to_dict(), "world_size": env.world_size}, indent=2))
    barrier()

    model: nn.Module = net
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)

    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[config.amp]) if config.amp else nullcontext()
    progress = (sys.stderr.isatty() if config.progress is None else config.progress) and env.is_main
    eval_batch = max(local_batch, 256)
    test_loader = _loader(_shard(data.test, env), eval_batch, config.workers, device)
    train_eval_loader = _loader(_shard(data.train_eval, env), eval_batch, config.workers, device)
    mixup = torch.distributions.Beta(recipe.mixup_alpha, recipe.mixup_alpha) if recipe.mixup_alpha > 0 else None

    for epoch in range(start_epoch + 1, recipe.epochs + 1):
        if stop_after is not None and epoch > stop_after:
            return {"stopped_after": epoch - 1, "best_test_acc": best_acc, "best_epoch": best_epoch}
        torch.manual_seed(_epoch_seed(config.seed, epoch) + env.rank)
        shuffle_seed = _epoch_seed(config.seed, epoch)
        if env.distributed:
            sampler = DistributedSampler(train_set, env.world_size, env.rank, shuffle=True, seed=shuffle_seed, drop_last=True)
        else:
            sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(shuffle_seed))
        loader = _loader(
            train_set, local_batch, config.workers, device, sampler=sampler, drop_last=True,
            generator=torch.Generator().manual_seed(shuffle_seed + 1 + env.rank),
        )
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (global over ranks)
        t0 = time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch * recipe.batch_size, unit="img", unit_scale=True, disable=not progress,
            desc=f"{config.norm} s{config.seed} epoch {epoch}/{recipe.epochs}", leave=False, file=sys.stderr,
        )
        for step, (x, y) in enumerate(loader, start=1):
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with autocast:
                if mixup is not None:
                    lam = float(mixup.sample())
                    perm = torch.randperm(x.shape[0], device=device)
                    logits = model(lam * x + (1.0 - lam) * x[perm])
                    loss = lam * criterion(logits, y) + (1.0 - lam) * criterion(logits, y[perm])
                else:
                    logits = model(x)
                    loss = criterion(logits, y)
            stats = torch.stack([loss.detach().double() * y.numel(), (logits.argmax(1) == y).sum().double(),
                                 torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
            all_reduce_sum(stats)
            stats = stats.cpu()
            if not math.isfinite(float(stats[0])):
                bar.close()
                kept = (f"the last good checkpoint is {last_path} (epoch {epoch - 1})" if epoch > 1
                        else "no checkpoint was written yet")
                raise NonFiniteLossError(
                    f"non-finite training loss ({float(stats[0] / stats[2])}) at epoch {epoch}, step {step} of "
                    f"{steps_per_epoch}; training stopped, {kept}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            clip_gates()
            sums += stats
            bar.update(int(stats[2]))
            if step % 10 == 0 or step == steps_per_epoch:
                bar.set_postfix(loss=f"{float(sums[0] / sums[2]):.4f}", lr=f"{scheduler.get_last_lr()[0]:.4g}")
        bar.close()
        train_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        measure = epoch % recipe.metrics_every == 0 or epoch == recipe.epochs
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": float(sums[0] / sums[2]),
            "train_acc": float(100.0 * sums[1] / sums[2]),
        }
        record.update(
            evaluate(
                model, test_loader, train_eval_loader if measure else None, num_classes=data.num_classes,
                device=device, amp=config.amp, channels_last=config.channels_last,
                max_batches=recipe.metrics_max_batches, feature_model=net,
            )
        )
        eval_seconds = time.perf_counter() - t1
        improved = record["test_acc"] > best_acc
        if improved:
            best_acc, best_epoch = record["test_acc"], epoch
        if env.is_main:
            _append_jsonl(metrics_path, record)
            _append_jsonl(timing_path, {
                "epoch": epoch, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                "train_images_per_second": float(sums[2]) / train_seconds,
            })
            state = {
                "model": net.state_dict(), "epoch": epoch, "best_acc": best_acc, "best_epoch": best_epoch,
                "config": config.to_dict(), "num_classes": data.num_classes, "in_channels": data.in_channels,
            }
            if improved:
                _atomic_save(state, best_path)
            _atomic_save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict()}, last_path)
        barrier()
        angles = (f" intra {record['intra_train']:.2f}/{record['intra_test']:.2f} inter {record['inter']:.2f} "
                  f"IIR {record['iir_train']:.3f}/{record['iir_test']:.3f}") if measure else ""
        say(f"[{config.dataset} {config.model} {config.norm} seed {config.seed}] epoch {epoch}/{recipe.epochs} "
            f"loss {record['train_loss']:.4f} train {record['train_acc']:.2f}% test {record['test_acc']:.2f}%"
            f"{angles} ({train_seconds:.1f}s + {eval_seconds:.1f}s)")

    records = [json.loads(ln) for ln in metrics_path.read_text().splitlines()] if env.is_main else []
    final = records[-1] if records else {}
    summary = {
        "best_test_acc": best_acc,
        "best_epoch": best_epoch,
        "final": final,
        "epochs": recipe.epochs,
        "world_size": env.world_size,
        "config": config.to_dict(),
    }
    if env.is_main:
        _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
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
    """Test accuracy and angle metrics of a saved model (``last.pt``/``best.pt``); ``dataset`` defaults to
    the one it was trained on."""
    from .ddp import resolve_device

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = TrainConfig.from_dict(ckpt["config"])
    dev = resolve_device(device)
    data = data or build_data(dataset or config.dataset, data_dir or config.data_dir, augment=False)
    if data.num_classes != ckpt["num_classes"] or data.in_channels != ckpt["in_channels"]:
        raise ValueError(
            f"{path} was trained for {ckpt['num_classes']} classes / {ckpt['in_channels']} channels, dataset "
            f"{data.name!r} has {data.num_classes} / {data.in_channels}"
        )
    make = model_fn or (lambda **kw: build_model(config.model, **kw, **config.model_kwargs))
    net = make(num_classes=data.num_classes, in_channels=data.in_channels, norm=config.norm)
    net.load_state_dict(ckpt["model"])
    net.to(dev)
    batch = max(config.recipe.batch_size, 256)
    result = evaluate(
        net, _loader(data.test, batch, 0, dev), _loader(data.train_eval, batch, 0, dev),
        num_classes=data.num_classes, device=dev, max_batches=max_batches,
    )
    return {"checkpoint": str(path), "epoch": ckpt["epoch"], "dataset": data.name, "model": config.model,
            "norm": config.norm, **result}
