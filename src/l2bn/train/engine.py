"""The training loop: one run of (dataset, model, norm, seed, recipe) with checkpoints, resume and metrics.

Split the way torchvision's ``references/classification/train.py`` is: :func:`setup` (data, model,
optimiser, loaders, resume), :func:`train_one_epoch`, :func:`~l2bn.train.evaluate.evaluate` (test
loss/accuracy and the paper's angle metrics of the classifier-input features, supplementary A),
:func:`save_checkpoint` and :func:`write_summary`; :func:`train` is the epoch loop over them. Every file goes
through :class:`~l2bn.train.rundir.RunDir`.

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
import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from ..data import DataBundle
from ..data.batched import InMemoryBatches
from ..kernels.dispatch import impl_setting
from ..norm_spread import NormSpread
from .config import AMP_DTYPES, TrainConfig, check_same_experiment
from .ddp import DistEnv, all_reduce_sum, barrier, cleanup_distributed, setup_distributed, sync_norms
from .evaluate import evaluate
from .loaders import make_eval_loader, make_train_loader, prepare_data, shard
from .mixup import forward_loss
from .model import ModelFn, run_model_fn
from .optim import build_optimizer, build_scheduler, gate_clipper
from .rundir import ANGLE_KEYS, DEVICE_KEYS, EPOCH_KEYS, EXTRA_KEYS, NORM_STATE_KEYS, VAL_KEYS, RunBusyError, RunDir
from .tensorboard import write_record as write_tensorboard

__all__ = ["NonFiniteLossError", "RunState", "norm_epoch_state", "save_checkpoint", "setup", "train",
           "train_one_epoch", "write_summary"]

ABSURD_LOSS_FACTOR = 1e6  # a finite loss this many times the first epoch's warns (once a run)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message and ``failure`` name the run, epoch and step."""

    def __init__(self, message: str, failure: dict[str, Any]) -> None:
        super().__init__(message)
        self.failure = failure


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


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
    train_loader: DataLoader | InMemoryBatches
    test_loader: DataLoader | InMemoryBatches
    train_eval_loader: DataLoader | InMemoryBatches
    val_loader: DataLoader | InMemoryBatches | None
    shuffle_generators: tuple[torch.Generator, torch.Generator]
    steps_per_epoch: int
    say: Callable[[str], None]
    start_epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    first_loss: float | None = None
    warned_absurd_loss: bool = False


def setup(config: TrainConfig, env: DistEnv, run: RunDir, model_fn: ModelFn | None, data: DataBundle | None,
          say: Callable[[str], None]) -> RunState:
    """Data, model, optimiser, schedule and loaders of a run (nothing is written: the folder may not exist yet)."""
    recipe, device = config.recipe, env.device
    if recipe.batch_size % env.world_size:
        raise ValueError(f"batch size {recipe.batch_size} is not divisible by the world size {env.world_size}")
    local_batch = recipe.batch_size // env.world_size
    data = prepare_data(config, data, env)
    if len(data.train) < recipe.batch_size:
        raise ValueError(f"batch size {recipe.batch_size} exceeds the {len(data.train)} training samples")
    torch.manual_seed(config.seed)
    net = run_model_fn(config, model_fn)(num_classes=data.num_classes, in_channels=data.in_channels, norm=config.norm)
    if env.distributed and config.sync_bn:
        net = sync_norms(net, device)
    net.to(device)
    if config.channels_last:
        net.to(memory_format=torch.channels_last)
    steps_per_epoch = len(data.train) // recipe.batch_size
    optimizer, scheduler = build_optimizer(net, recipe, steps_per_epoch)
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
        train_loader=make_train_loader(config, data.train, local_batch, device, sampler, generators[1]),
        test_loader=make_eval_loader(shard(data.test, env), eval_batch, config.workers, device),
        train_eval_loader=make_eval_loader(shard(data.train_eval, env), eval_batch, config.workers, device),
        val_loader=make_eval_loader(shard(data.val, env), eval_batch, config.workers, device) if data.val else None,
        shuffle_generators=generators, steps_per_epoch=steps_per_epoch, say=say,
    )
    return state


def _restore(state: RunState) -> None:
    """Load ``last.pt`` into the state (same experiment only); drop log lines of epochs it did not save."""
    run, config = state.run, state.config
    ckpt = run.load_checkpoint(run.last_path, map_location=state.env.device, for_resume=True)
    check_same_experiment(ckpt["config"], config, run.last_path)
    if ckpt.get("l2bn_impl", "auto") != impl_setting():
        warnings.warn(f"resuming {run.path} with L2BN_IMPL={impl_setting()!r}, but it started with "
                      f"{ckpt.get('l2bn_impl', 'auto')!r}: the records will not be byte-identical to an "
                      "uninterrupted run", RuntimeWarning, stacklevel=2)
    state.net.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    try:
        state.scheduler.load_state_dict(ckpt["scheduler"])
    except (KeyError, TypeError, ValueError) as error:
        _replay_schedule(state, ckpt["epoch"], error)
    state.scaler.load_state_dict(ckpt["scaler"])
    state.start_epoch, state.best_acc, state.best_epoch = ckpt["epoch"], ckpt["best_acc"], ckpt["best_epoch"]
    state.say(f"resuming {run.path} after epoch {state.start_epoch}")
    if state.env.is_main:
        run.keep_epochs(state.start_epoch)
        records = run.read_records()
        state.first_loss = records[0]["train_loss"] if records else None


def _replay_schedule(state: RunState, epochs_done: int, error: Exception) -> None:
    """A ``last.pt`` whose schedule state this version cannot load (written before the schedules became torch's
    schedulers): a fresh schedule stepped through the finished epochs' steps instead, with a warning. Stepping
    is what an uninterrupted run of this version does, so its learning rates are the ones that run would use;
    those of the version that wrote the checkpoint may differ in the last bits."""
    warnings.warn(f"{state.run.last_path}: its learning-rate schedule state was written by an older l2bn "
                  f"({type(error).__name__}: {error}); resuming with this version's schedule stepped through the "
                  f"{epochs_done} finished epoch(s)", RuntimeWarning, stacklevel=3)
    for group in state.optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    state.scheduler = build_scheduler(state.optimizer, state.config.recipe, state.steps_per_epoch)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": no step is taken here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs_done * state.steps_per_epoch):
            state.scheduler.step()


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
    clip_gates = gate_clipper(state.net)
    spread = NormSpread(state.net) if recipe.norm_spread else None
    state.model.train()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (global over ranks)
    start = time.perf_counter()
    bar = tqdm(total=state.steps_per_epoch * recipe.batch_size, unit="img", unit_scale=True, disable=not progress,
               desc=f"{config.norm} s{config.seed} epoch {epoch}/{recipe.epochs}", leave=False, file=sys.stderr)
    for step, (x, y) in enumerate(_watched(state.train_loader, spread), start=1):
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with autocast:
            logits, loss = forward_loss(state.model, x, y, criterion, mixup, recipe.mixup_per_sample)
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
    out = {"train_loss": float(sums[0] / sums[2]), "train_acc": float(100.0 * sums[1] / sums[2]),
           "images": float(sums[2]), "seconds": time.perf_counter() - start}
    if spread is not None:
        out["norm_cv"] = spread.summary()
    return out


def _watched(loader: DataLoader, spread: NormSpread | None) -> Iterator:
    """The loader's batches, with ``spread``'s hooks installed while they are trained on."""
    with spread if spread is not None else contextlib.nullcontext():
        yield from loader


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


def norm_epoch_state(model: nn.Module) -> dict[str, float]:
    """The per-epoch state the model's norm layers report: every module class with a static
    ``epoch_summary(layers) -> dict`` (e.g. UBN's condensation) is called once with all its layers."""
    layers: dict[Callable, list[nn.Module]] = {}
    for m in model.modules():
        summary = getattr(type(m), "epoch_summary", None)
        if callable(summary):
            layers.setdefault(summary, []).append(m)
    return {k: v for summary, found in layers.items() for k, v in summary(found).items()}


def save_checkpoint(state: RunState, epoch: int, improved: bool) -> None:
    """``best.pt`` (model) when the selection accuracy improved, then ``last.pt`` (everything resume needs)."""
    saved = {"model": state.net.state_dict(), "epoch": epoch, "best_acc": state.best_acc,
             "best_epoch": state.best_epoch, "config": state.config.to_dict(), "num_classes": state.data.num_classes,
             "in_channels": state.data.in_channels, "l2bn_impl": impl_setting()}
    if improved:
        state.run.save_checkpoint(saved, best=True)
    state.run.save_checkpoint({**saved, "optimizer": state.optimizer.state_dict(),
                               "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict()})


def write_summary(state: RunState) -> dict[str, Any]:
    records = state.run.read_records() if state.env.is_main else []
    summary = {"best_test_acc": max((r["test_acc"] for r in records), default=state.best_acc),
               "best_epoch": state.best_epoch, "final": records[-1] if records else {},
               "epochs": state.config.recipe.epochs, "world_size": state.env.world_size,
               "config": state.config.to_dict()}
    if state.val_loader is not None and records:  # the epoch chosen on the validation split, and its test accuracy
        summary.update(best_val_acc=state.best_acc, selected_test_acc=records[state.best_epoch - 1]["test_acc"])
    if state.env.is_main:
        state.run.write_summary(summary)
    return summary


def _run_epoch(state: RunState, epoch: int, progress: bool) -> dict[str, Any]:
    """Train one epoch, evaluate, log and checkpoint it; returns the logged record."""
    config, recipe = state.config, state.config.recipe
    trained = train_one_epoch(state, epoch, progress)
    start = time.perf_counter()
    measure = epoch % recipe.metrics_every == 0 or epoch == recipe.epochs
    record: dict[str, Any] = {"epoch": epoch, "lr": state.optimizer.param_groups[0]["lr"], **trained}
    record.update(evaluate(
        state.model, state.test_loader, state.train_eval_loader if measure else None, val_loader=state.val_loader,
        num_classes=state.data.num_classes, device=state.env.device, amp=config.amp,
        channels_last=config.channels_last, max_batches=recipe.metrics_max_batches, feature_model=state.net,
    ))
    eval_seconds = time.perf_counter() - start
    record.update(norm_epoch_state(state.net))
    record = {k: record[k] for k in (*EPOCH_KEYS, *VAL_KEYS, *ANGLE_KEYS, *EXTRA_KEYS, *NORM_STATE_KEYS, *DEVICE_KEYS)
              if k in record}
    _check_loss(state, record["train_loss"])
    selection = record["val_acc" if state.val_loader is not None else "test_acc"]
    improved = selection > state.best_acc
    if improved:
        state.best_acc, state.best_epoch = selection, epoch
    if state.env.is_main:
        state.run.append_record(record)
        write_tensorboard(state.run.path, record)  # when tensorboard is installed
        state.run.append_timing({"epoch": epoch, "train_seconds": trained["seconds"], "eval_seconds": eval_seconds,
                                 "train_images_per_second": trained["images"] / trained["seconds"]})
        save_checkpoint(state, epoch, improved)
    barrier()
    angles = (f" intra {record['intra_train']:.2f}/{record['intra_test']:.2f} inter {record['inter']:.2f} "
              f"IIR {record['iir_train']:.3f}/{record['iir_test']:.3f}") if measure else ""
    gate = "".join(f" {k} {record[k]:.3f}" for k in NORM_STATE_KEYS if k in record)
    state.say(f"[{config.dataset} {config.model} {config.norm} seed {config.seed}] epoch {epoch}/{recipe.epochs} "
              f"loss {record['train_loss']:.4f} train {record['train_acc']:.2f}% "
              + (f"val {record['val_acc']:.2f}% " if "val_acc" in record else "") + f"test {record['test_acc']:.2f}%"
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

    ``model_fn(num_classes=, in_channels=, norm=)`` overrides :func:`~l2bn.train.model.build_model`; ``data`` overrides
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
