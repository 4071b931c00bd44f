"""Synchronized L2BN's training call against torch's SyncBatchNorm and the local layers, over a group of one rank.

    python benchmarks/bench_sync.py --device cuda [--dtype bf16] [--shapes 128x256x56x56,...] [--repeats 20]

A process group of this process alone (nccl on CUDA, gloo on the CPU) runs every collective for real, as one
rank of a DDP job does; ``nn.SyncBatchNorm`` skips synchronising at world size 1, so its autograd Function is
called directly (CUDA only: torch's kernels for it are CUDA-only). Each row times, interleaved in one process
(minima of ``--repeats`` rounds, forward + backward, synchronising the device around each call): BatchNorm and
L2BatchNorm of the input's rank (the local path ``auto`` picks), torch's SyncBatchNorm, and ``sync_l2_batch_norm`` through the
torch ops and through the fast path of the device (the Triton kernels on CUDA, the compiled kernel on the CPU);
and prints each time's ratio to
BatchNorm and the synchronized L2BN paths' ratios to SyncBatchNorm. On a GPU the whole call is host-bound
at small shapes, so the launch counts (docs/distributed.md) show there.
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNormFunction

from l2bn.bench import DTYPES, environment_line, interleaved_times_ms
from l2bn.kernels import cpp
from l2bn.kernels.sync import sync_l2_batch_norm
from l2bn.layers import L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d

RESNET50_SHAPES = "128x64x56x56,128x256x56x56,128x512x28x28,128x2048x7x7,32x64x8x8"
LAYERS = {2: (nn.BatchNorm1d, L2BatchNorm1d), 3: (nn.BatchNorm1d, L2BatchNorm1d), 4: (nn.BatchNorm2d, L2BatchNorm2d),
          5: (nn.BatchNorm3d, L2BatchNorm3d)}  # by input rank


def _steps(x: torch.Tensor, group: dist.ProcessGroup) -> dict[str, Callable[[], None]]:
    """One timed training call (forward + backward) of each layer or op on ``x``, by name."""
    c, device, dtype = x.shape[1], x.device, x.dtype
    grad = torch.randn_like(x)
    weight, bias = (torch.ones(c, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    running = [torch.zeros(c, device=device, dtype=dtype), torch.ones(c, device=device, dtype=dtype)]
    xg = x.detach().requires_grad_()

    def call(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            fn(xg).backward(grad)
            xg.grad = weight.grad = bias.grad = None
        return step

    bn, l2bn = LAYERS[x.dim()]
    layers = {name: cls(c, device=device, dtype=dtype) for name, cls in (("BN", bn), ("L2BN", l2bn))}
    steps = {name: call(layer) for name, layer in layers.items()}
    if device.type == "cuda":
        steps["SyncBN (torch)"] = call(lambda t: TorchSyncBatchNormFunction.apply(
            t, weight, bias, *running, 1e-5, 0.1, group, 1))
    impls = ["fused"] + (["triton"] if device.type == "cuda" and importlib.util.find_spec("triton") else [])
    impls += ["cpp"] if device.type == "cpu" and cpp.available() else []
    for impl in impls:
        steps[f"SyncL2BN ({'torch ops' if impl == 'fused' else impl})"] = call(
            lambda t, impl=impl: sync_l2_batch_norm(t, *running, weight, bias, 0.1, 1e-5, group, impl=impl))
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shapes", default=RESNET50_SHAPES,
                        help="comma-separated NxC[xL[xH[xW]]] (default: ResNet-50's shapes at batch 128 and a small one)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        print(environment_line(device) + f"; {args.dtype}; one rank; minima of {args.repeats} interleaved calls")
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        for i, spec in enumerate(args.shapes.split(",")):
            shape = tuple(int(v) for v in spec.split("x"))
            x = torch.randn(shape, device=device, dtype=DTYPES[args.dtype]).to(memory_format=fmt)
            steps = _steps(x, dist.group.WORLD)
            times = dict(zip(steps, (min(t) for t in interleaved_times_ms(list(steps.values()), device,
                                                                           args.repeats, warmup=3))))
            if i == 0:
                print("| shape | " + " | ".join(f"{name} ms" for name in times) + " | ratios to BN | to SyncBN |")
                print("|---|" + "---:|" * (len(times) + 2))
            to_bn = ", ".join(f"{name} {ms / times['BN']:.2f}" for name, ms in times.items() if name != "BN")
            sync_bn = times.get("SyncBN (torch)")
            to_sync = ", ".join(f"{name} {ms / sync_bn:.2f}" for name, ms in times.items()
                                if sync_bn and name.startswith("SyncL2BN")) or "—"
            print(f"| {spec} | " + " | ".join(f"{ms:.3f}" for ms in times.values()) + f" | {to_bn} | {to_sync} |",
                  flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
