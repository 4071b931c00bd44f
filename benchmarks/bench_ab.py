"""L2BN / BatchNorm time ratios at given shapes, for A/B comparisons of two kernel versions.

    python benchmarks/bench_ab.py 128x16x32x32,64x436x8x8cl [--threads 1] [--mode eval]

A shape ending in ``cl`` is timed channels-last. Per shape, BatchNorm and L2BN calls alternate (20–400 of each,
fewer for larger tensors) and the ratio of their minima and of their 25th percentiles is printed. To compare
kernel versions, run it in two checkouts (e.g. a ``git worktree`` at the old commit: the kernel's build folder
is keyed by its source, so both stay built) alternately, several times: on a shared host single runs move by
±0.2, and only differences that survive the alternation mean anything (docs/performance.md).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from l2bn import L2BatchNorm1d, L2BatchNorm2d
from l2bn.bench import layer_steps


def parse_shape(spec: str) -> tuple[tuple[int, ...], bool]:
    """``"64x436x8x8cl"`` → ((64, 436, 8, 8), True)."""
    channels_last = spec.endswith("cl")
    return tuple(int(d) for d in spec.removesuffix("cl").split("x")), channels_last


def ratios(shape: tuple[int, ...], channels_last: bool, mode: str) -> tuple[int, float, float, float, float]:
    """(calls, BN min ms, L2BN min ms, ratio of minima, ratio of 25th percentiles)."""
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layers = [nn.BatchNorm1d(shape[1]), L2BatchNorm1d(shape[1])] if len(shape) == 2 else \
        [nn.BatchNorm2d(shape[1]), L2BatchNorm2d(shape[1])]
    steps = layer_steps(layers, x, mode)
    calls = int(min(400, max(20, 5e7 / x.numel())))
    for _ in range(3):
        for step in steps:
            step()
    samples: list[list[float]] = [[], []]
    for _ in range(calls):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            samples[i].append((time.perf_counter() - start) * 1e3)
    bn, l2 = (sorted(s) for s in samples)
    p25 = (calls - 1) // 4
    return calls, bn[0], l2[0], l2[0] / bn[0], l2[p25] / bn[p25]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", help="comma-separated, e.g. 128x16x32x32,64x436x8x8cl (cl: channels-last)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=("train", "eval"), default="eval")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.shapes.split(","):
        calls, bn, l2, ratio_min, ratio_p25 = ratios(*parse_shape(spec), args.mode)
        print(f"{spec:>18} {args.mode} calls {calls:3d}  BN min {bn:.3f} L2 min {l2:.3f}  ratio min {ratio_min:.2f}"
              f"  ratio p25 {ratio_p25:.2f}", flush=True)


if __name__ == "__main__":
    main()
