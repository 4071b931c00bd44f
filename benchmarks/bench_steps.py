"""Whole SGD steps of the zoo's CIFAR models, BatchNorm against L2BN, eager and under ``torch.compile``.

    python benchmarks/bench_steps.py [--models resnet20,resnet56,vgg16_bn] [--layouts NCHW,channels_last]
                                     [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--batch 128] [--repeats 5]
                                     [--threads N] [--mode train|eval] [--no-onednn]
                                     [--compile default|reduce-overhead|max-autotune-no-cudagraphs] [--backend inductor]

One step is zero_grad, forward, cross-entropy, backward and SGD (momentum 0.9) on one fixed batch of 32×32 images;
each row times the BatchNorm and the L2BN model alternately (minimum of ``--repeats`` steps each, after warm-up) and
prints their ratio. With ``--compile MODE`` each model is also run as ``torch.compile(model, mode=MODE)`` (the
optimizer stays eager): the first step's time — tracing and code generation, what an epoch pays once — is printed
beside the compiled steps' minimum. Under ``torch.compile`` L2BN runs the compiled kernel's graph operators on
the CPU (``l2bn.kernels.cpp_custom_op``) and elsewhere its torch-op path, which the compiler fuses
(``l2bn.kernels.dispatch``). On a GPU, ``reduce-overhead`` replays the step's kernels from CUDA graphs, the remedy
docs/performance.md gives for small layers whose eager calls are bound by the host's launches (session 17: eager
ResNet-20 steps 2.5–2.9× BatchNorm's on the H200).

With ``--mode eval`` the rows time inference instead: one forward in eval mode under ``torch.no_grad`` (the test
pass's; at ``--batch 1``, serving one image, per-call costs dominate).

``--no-onednn`` turns torch's oneDNN (mkldnn) off for the run, so that CPU convolutions take ATen's im2col and
matrix-multiply path instead: the alternative to oneDNN's convolutions, which are most of a CPU step.

``bench_census.py --steps`` prints the eager rows of this script at its step models.
"""
from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from typing import Sequence

import torch
import torch.nn as nn

from l2bn.bench import DTYPES, environment_line, inference_ms, synchronize, training_step_ms
from l2bn.models import create_model

STEP_MODELS = ("resnet20", "resnet56", "vgg16_bn")  # batch 128, both layouts
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
UNITS = {"train": "step", "eval": "forward"}  # what a row times in each --mode


def models_and_batch(name: str, layout: str, device: torch.device, dtype: torch.dtype, batch: int
                     ) -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    """([BatchNorm model, L2BN model] with the same initial weights where they share parameters, images, labels)."""
    fmt = LAYOUTS[layout]
    x = torch.randn(batch, 3, 32, 32, device=device, dtype=dtype).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (batch,), device=device)
    nets = []
    for norm in ("bn", "l2bn"):
        torch.manual_seed(0)
        nets.append(create_model(name, num_classes=10, norm_layer=norm).to(device, dtype, memory_format=fmt))
    return nets, x, target


def first_step_seconds(models: Sequence[nn.Module], x: torch.Tensor, target: torch.Tensor, mode: str = "train"
                       ) -> list[float]:
    """Seconds of each model's first SGD step, or forward in eval (for a compiled model: its compilation)."""
    seconds = []
    for model in models:
        synchronize(x.device)
        start = time.perf_counter()
        if mode == "train":
            nn.functional.cross_entropy(model(x), target).backward()
        else:
            with torch.no_grad():
                model.eval()(x)
        synchronize(x.device)
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return seconds


def step_rows(names: Sequence[str], layouts: Sequence[str], device: torch.device, dtype: torch.dtype, *,
              batch: int = 128, repeats: int = 5, compile_mode: str | None = None, backend: str = "inductor",
              warmup: int = 1, mode: str = "train") -> list[str]:
    """Markdown rows, printed as they are timed: per model and layout, eager BN and L2BN steps (``mode`` train) or
    eval forwards (eval) and their ratio; with ``compile_mode`` the compiled ones' too, and each compiled model's
    first step or forward (compile) in seconds."""
    rows = []

    def timed(models: Sequence[nn.Module], x: torch.Tensor, target: torch.Tensor, warmup: int) -> list[float]:
        if mode == "train":
            return training_step_ms(models, x, target, repeats=repeats, warmup=warmup)
        return inference_ms(models, x, repeats=repeats, warmup=warmup)

    for name in names:
        for layout in layouts:
            nets, x, target = models_and_batch(name, layout, device, dtype, batch)
            start = time.perf_counter()
            bn, l2 = timed(nets, x, target, warmup)
            row = f"| {name} | {layout} | {batch} | {bn:.2f} | {l2:.2f} | {l2 / bn:.2f} |"
            if compile_mode is not None:
                torch._dynamo.reset()  # no cache limit reached across rows; each model compiles afresh
                options = {} if compile_mode == "default" else {"mode": compile_mode}
                compiled = [torch.compile(net, backend=backend, **options) for net in nets]
                first = first_step_seconds(compiled, x, target, mode)
                # reduce-overhead records its CUDA graphs over the first calls: three warm-up steps
                c_bn, c_l2 = timed(compiled, x, target, max(warmup, 3))
                row += (f" {c_bn:.2f} | {c_l2:.2f} | {c_l2 / c_bn:.2f} | {first[0]:.0f} / {first[1]:.0f} |"
                        f" {bn / c_bn:.2f} / {l2 / c_l2:.2f} |")
            print(row + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
            rows.append(row)
    return rows


def header(compile_mode: str | None, mode: str = "train") -> str:
    unit = UNITS[mode]
    head = f"| model | layout | batch | BN {unit} ms | L2BN {unit} ms | ratio |"
    if compile_mode is None:
        return head + "\n|---|---|---:|---:|---:|---:|"
    return (head + f" compiled BN ms | compiled L2BN ms | compiled ratio | compile s (BN / L2BN) |"
            f" eager / compiled (BN / L2BN) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(STEP_MODELS), help="comma-separated zoo models")
    parser.add_argument("--layouts", default="NCHW,channels_last", help=f"comma-separated: {', '.join(LAYOUTS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each model (minimum)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", choices=COMPILE_MODES, default=None, dest="compile_mode",
                        help="also time torch.compile(model, mode=...) steps (the first step, compiling, apart)")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (with --compile)")
    parser.add_argument("--mode", choices=sorted(UNITS), default="train",
                        help="train: SGD steps; eval: forwards in eval mode under no_grad")
    parser.add_argument("--no-onednn", action="store_true",
                        help="CPU convolutions without oneDNN (torch.backends.mkldnn.flags(enabled=False))")
    args = parser.parse_args(argv)
    layouts = args.layouts.split(",")
    if unknown := [layout for layout in layouts if layout not in LAYOUTS]:
        parser.error(f"--layouts: unknown {unknown}; expected {list(LAYOUTS)}")
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled = "" if args.compile_mode is None else f"; torch.compile mode {args.compile_mode}, backend {args.backend}"
    onednn = "; oneDNN off" if args.no_onednn else ""
    print(f"{environment_line(device)}; dtype {args.dtype}; mode {args.mode}{compiled}{onednn}")
    print(header(args.compile_mode, args.mode))
    onednn_off = torch.backends.mkldnn.flags(enabled=False) if args.no_onednn else contextlib.nullcontext()
    with warnings.catch_warnings():
        # (the flags context also sets oneDNN's TF32 switch, which warns on builds without Intel GPU support)
        warnings.filterwarnings("ignore", message=".*Intel GPU")
        with onednn_off:
            step_rows(args.models.split(","), layouts, device, DTYPES[args.dtype], batch=args.batch,
                      repeats=args.repeats, compile_mode=args.compile_mode, backend=args.backend, mode=args.mode)


if __name__ == "__main__":
    main()
