"""Device time of each kernel inside one L2BN call on a GPU, beside BatchNorm's kernels in the same run.

    python benchmarks/bench_kernels.py [--shapes 128x2048x7x7,128x256x56x56] [--layouts nchw,cl]
                                       [--dtype fp32|bf16] [--modes train,eval] [--calls 20] [--device cuda|cpu]

Where the census (``bench_census.py --cuda-graphs``) says a call is slow on the device, this says which of its
kernels is: each row is one (shape, layout, mode, layer), profiled over ``--calls`` calls with torch.profiler's
CUDA activity; every kernel's device µs a call is printed with its share, and the call's big-tensor traffic
(``l2bn.bench.PASSES`` passes) over the summed kernel time as GB/s. With ``--device cpu`` the same table holds
each op's self CPU time (the compiled kernel's op, BatchNorm's aten ops): how the script is tested without a GPU.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn as nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from l2bn.bench import DTYPES, achieved_gbps, environment_line, layer_steps, synchronize
from l2bn.layers import L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d

LAYERS = {2: (nn.BatchNorm1d, L2BatchNorm1d), 3: (nn.BatchNorm1d, L2BatchNorm1d), 4: (nn.BatchNorm2d, L2BatchNorm2d),
          5: (nn.BatchNorm3d, L2BatchNorm3d)}


def kernel_us(step, calls: int, device: torch.device) -> dict[str, float]:
    """Device µs a call of each kernel that ``step`` launches (summed over its launches in a call); on the CPU,
    each op's self CPU µs a call."""
    cuda = device.type == "cuda"
    for _ in range(3):
        step()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
        synchronize(device)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if event.device_type == (DeviceType.CUDA if cuda else DeviceType.CPU) and us > 0:
            totals[event.key[:60]] += us / calls
    return dict(totals)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="128x2048x7x7,128x2048x8x8,128x256x56x56,16x64x56x56")
    parser.add_argument("--layouts", default="nchw,cl")
    parser.add_argument("--modes", default="train,eval")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(environment_line(device) + f"; {args.dtype}; device µs a call, {args.calls} calls profiled")
    print("| shape | layout | mode | layer | kernel | µs | share |")
    print("|---|---|---|---|---|---:|---:|")
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        for layout in args.layouts.split(","):
            if layout == "cl" and len(shape) not in (4, 5):
                continue
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape)) if layout == "cl" else None
            x = torch.randn(shape, device=device, dtype=dtype)
            x = x.contiguous(memory_format=fmt) if fmt is not None else x
            for mode in args.modes.split(","):
                for cls in LAYERS[len(shape)]:
                    layer = cls(shape[1], device=device, dtype=dtype)
                    (step,) = layer_steps([layer], x, mode)
                    kernels = kernel_us(step, args.calls, device)
                    total = sum(kernels.values())
                    gbps = achieved_gbps(shape, mode, x.element_size(), total / 1e3)
                    for name, us in sorted(kernels.items(), key=lambda item: -item[1]):
                        print(f"| {spec} | {layout} | {mode} | {cls.__name__} | {name} | {us:.1f} | "
                              f"{us / total:.0%} |")
                    print(f"| {spec} | {layout} | {mode} | {cls.__name__} | **all** | **{total:.1f}** | "
                          f"{gbps:.0f} GB/s |", flush=True)


if __name__ == "__main__":
    main()
