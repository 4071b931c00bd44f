"""Training-epoch throughput of the studies' path (Fashion-MNIST, ResNet-20, batch 128) and its faster variants.

    python benchmarks/bench_epoch.py [--threads 1 2] [--norms bn l2bn] [--steps 4] [--rounds 3] [--compile] [--amp]

Times, in one process and interleaved (A, B, C, A, B, C, ...; median of the rounds), N training steps of each
variant — the current path (DataLoader with per-sample torchvision transforms, NCHW, eager) against
channels_last, whole-batch augmentation (``augment="batched"``), ``torch.compile`` and their combinations — then
the test pass of evaluation (current DataLoader + ``no_grad`` against in-memory batches, ``inference_mode``
and larger batches), and the batch producers alone. Prints images/s and each ratio to the current path.
Compile time is measured separately (first steps minus steady steps) and amortised over an epoch of 469
steps (60 000 images) and of 39 steps (a 5 000-image subset). ``--amp`` adds the fast path under CPU autocast to
bfloat16 (the runner's ``--amp bf16``: convolutions in bfloat16, a documented change of the records' numerics),
for training and the test pass. ``--quick`` is the suite's smoke test.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.data import RandomSampler, Subset  # noqa: E402

from l2bn.data import build_data  # noqa: E402
from l2bn.data.batched import InMemoryBatches, in_memory_images  # noqa: E402
from l2bn.train import TrainConfig  # noqa: E402
from l2bn.train.evaluate import _forward_fn, test_pass  # noqa: E402
from l2bn.train.loaders import make_loader, make_train_loader  # noqa: E402
from l2bn.train.model import build_model  # noqa: E402
from l2bn.train.optim import build_optimizer  # noqa: E402

EPOCH_STEPS = {"epoch (60 000 images)": 469, "5 000-image subset": 39}


@dataclass
class Variant:
    """One way of running training steps: its own model (same initialisation), optimiser and batch stream."""

    name: str
    channels_last: bool = False
    augment: str = "per-sample"
    compile: bool = False
    amp: bool = False
    times: list[float] = field(default_factory=list)
    compile_seconds: float = 0.0


def _build(variant: Variant, data, norm: str, batch: int):
    """(step function, batch iterator) of ``variant``: the engine's training step on a fresh model."""
    config = TrainConfig(dataset="fashion-mnist", model="resnet20", norm=norm, augment=variant.augment)
    torch.manual_seed(0)
    net = build_model("resnet20", num_classes=10, in_channels=1, norm=norm)
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    optimizer, scheduler = build_optimizer(net, config.recipe, 469)
    model = torch.compile(net) if variant.compile else net
    autocast = _autocast(variant.amp)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(1)
    loader = make_train_loader(config, data.train, batch, torch.device("cpu"),
                               RandomSampler(data.train, generator=torch.Generator().manual_seed(2)), generator)

    def batches():
        while True:
            yield from loader

    def step(x, y):
        x = x.contiguous(memory_format=fmt)
        with autocast():
            logits = model(x)
            loss = criterion(logits, y)
        float(loss.detach()), int((logits.argmax(1) == y).sum())  # the engine's per-step statistics (a sync)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    return step, batches()


def _autocast(amp: bool):
    """The context the runner's ``--amp bf16`` trains and evaluates under (or none)."""
    return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext


def _timed(step, stream, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(stream))
    return time.perf_counter() - start


def bench_training(variants: list[Variant], data, norm: str, batch: int, steps: int, rounds: int) -> None:
    """Interleaved rounds of ``steps`` steps per variant; compile time = first two steps minus two steady ones."""
    built = []
    for v in variants:
        step, stream = _build(v, data, norm, batch)
        first = _timed(step, stream, 2)  # warm-up (and compilation)
        steady = _timed(step, stream, 2)
        v.compile_seconds = max(first - steady, 0.0) if v.compile else 0.0
        built.append((v, step, stream))
    for _ in range(rounds):
        for v, step, stream in built:
            v.times.append(_timed(step, stream, steps))


def bench_loaders(data, batch: int, batches: int, rounds: int) -> dict[str, float]:
    """Images/s of the two training batch producers alone (gather, augment, standardise)."""
    gen = torch.Generator().manual_seed(0)
    per_sample = make_loader(data.train, batch, 0, torch.device("cpu"), persistent=False,
                             sampler=RandomSampler(data.train, generator=gen), drop_last=True, generator=gen)
    batched = InMemoryBatches(data.train, in_memory_images(data.train), batch, drop_last=True, generator=gen,
                              sampler=RandomSampler(data.train, generator=gen))
    times: dict[str, list[float]] = {"per-sample DataLoader": [], "batched": []}
    for _ in range(rounds):
        for name, loader in zip(times, (per_sample, batched)):
            it, start = iter(loader), time.perf_counter()
            for _ in range(batches):
                next(it)
            times[name].append(time.perf_counter() - start)
    return {k: batches * batch / statistics.median(v) for k, v in times.items()}


def bench_eval(data, norm: str, images: int, rounds: int, amp: bool = False) -> dict[str, float]:
    """Images/s of the test pass: the current DataLoader + no_grad against in-memory batches, inference_mode
    and batch 1024 (the last changes test_loss's summation order, so its records are not bit-identical), and with
    ``amp`` in-memory batches under bfloat16 autocast, NCHW and channels_last."""
    torch.manual_seed(0)
    net = build_model("resnet20", num_classes=10, in_channels=1, norm=norm).eval()
    test = Subset(data.test, range(images))
    source = in_memory_images(test)
    variants = {
        "DataLoader, no_grad, 256 (current)": (make_loader(test, 256, 0, torch.device("cpu")), contextlib.nullcontext),
        "in-memory, no_grad, 256": (InMemoryBatches(test, source, 256), contextlib.nullcontext),
        "in-memory, inference_mode, 256": (InMemoryBatches(test, source, 256), torch.inference_mode),
        "in-memory, inference_mode, 1024": (InMemoryBatches(test, source, 1024), torch.inference_mode),
    }
    forwards = {name: _forward_fn(net, torch.device("cpu"), None, False) for name in variants}
    if amp:
        for name, channels_last in (("in-memory, no_grad, 256, bf16 autocast", False),
                                    ("in-memory, no_grad, 256, bf16 autocast, channels_last", True)):
            variants[name] = (InMemoryBatches(test, source, 256), contextlib.nullcontext)
            forwards[name] = _forward_fn(net, torch.device("cpu"), "bf16", channels_last)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, (loader, mode) in variants.items():
            start = time.perf_counter()
            with mode():
                test_pass(forwards[name], loader, num_classes=10, device=torch.device("cpu"))
            times[name].append(time.perf_counter() - start)
    return {k: images / statistics.median(v) for k, v in times.items()}


def _variants(with_compile: bool, with_amp: bool = False) -> list[Variant]:
    out = [Variant("current (per-sample, NCHW, eager)"), Variant("channels_last", channels_last=True),
           Variant("batched augment", augment="batched"),
           Variant("batched + channels_last", channels_last=True, augment="batched")]
    if with_compile:
        out += [Variant("compile", compile=True),
                Variant("compile + batched + channels_last", channels_last=True, augment="batched", compile=True)]
    if with_amp:
        out += [Variant("batched + channels_last + bf16 autocast", channels_last=True, augment="batched", amp=True)]
    return out


def _print_training(variants: list[Variant], batch: int, steps: int) -> None:
    rate = {v.name: steps * batch / statistics.median(v.times) for v in variants}
    base = rate[variants[0].name]
    print("| variant | images/s | ratio | " + " | ".join(f"ratio over a {k}, compile counted" for k in EPOCH_STEPS)
          + " |")
    print("|---|---:|---:|" + "---:|" * len(EPOCH_STEPS))
    for v in variants:
        step_s = batch / rate[v.name]
        amortised = [base * (n * step_s + v.compile_seconds) / (n * batch) for n in EPOCH_STEPS.values()]
        amortised = [1 / a for a in amortised]
        extra = f" (compile {v.compile_seconds:.0f} s)" if v.compile else ""
        print(f"| {v.name}{extra} | {rate[v.name]:.0f} | {rate[v.name] / base:.2f} | "
              + " | ".join(f"{a:.2f}" for a in amortised) + " |")


def _print_rates(title: str, rates: dict[str, float]) -> None:
    base = next(iter(rates.values()))
    print(f"\n| {title} | images/s | ratio |\n|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--norms", nargs="+", default=["bn", "l2bn"])
    p.add_argument("--steps", type=int, default=4, help="training steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-images", type=int, default=2560)
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants (minutes to compile)")
    p.add_argument("--amp", action="store_true", help="also time the fast path under bfloat16 autocast")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (the test suite's)")
    args = p.parse_args(argv)
    if args.quick:
        args.threads, args.norms, args.steps, args.rounds, args.batch, args.eval_images = [1], ["bn"], 1, 1, 16, 64
    data = build_data("fashion-mnist")
    print(f"device: CPU ({_cpu_model()}), torch {torch.__version__}; load average before: {_load()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        _print_rates(f"training batch producer, {threads} thread(s)", bench_loaders(data, args.batch, 8, args.rounds))
        for norm in args.norms:
            print(f"\n### {norm}, {threads} thread(s), batch {args.batch}, {args.steps} steps x {args.rounds} rounds\n")
            variants = _variants(args.compile, args.amp)
            bench_training(variants, data, norm, args.batch, args.steps, args.rounds)
            _print_training(variants, args.batch, args.steps)
            _print_rates(f"test pass ({args.eval_images} images), {norm}",
                         bench_eval(data, norm, args.eval_images, args.rounds, args.amp))
    print(f"\nload average after: {_load()}")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    return "unknown CPU"


def _load() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


if __name__ == "__main__":
    main()
