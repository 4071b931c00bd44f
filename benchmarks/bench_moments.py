"""The training backward's first pass alone: L2BN's per-(n, c) moments against BatchNorm's per-channel sums.

    python benchmarks/bench_moments.py 128x256x8x8,128x64x16x16 [--threads 1 2] [--against REV] [--repeats 4]
                                       [--cache hot|cold|network]

Channels-last input. L2BN's pass is ``torch.ops.l2bn_cpu.sync_gradient_sums`` (the moments pass over (x, dy) and
the O(N·C) sums after it); BatchNorm's is ``aten.native_batch_norm_backward`` with output mask (False, True, True),
its Σdy / Σdy·(x − μ) pass without the dx pass. ``--against REV`` also times the compiled kernel's source at that
git revision (bench_ab.py's build, ``l2bn_cpu_ab``) and says whether its sums equal the current build's bit for bit.
Calls of the two or three ops alternate in blocks of 40, each thread count in turn, in one process; minima (µs).

``--cache`` sets where (x, dy) are when a call starts: ``hot`` (the default) leaves them where the last call left
them (in the L3 up to ~10 MiB each); ``cold`` writes a 128 MiB buffer before each call (untimed), so both come from
memory; ``network`` does that, then rewrites dy in place (``dy.mul_(1)``): x from memory and dy just written, as
in a network's backward, where a layer's x was written in the forward long before and dy by the op just before.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from bench_ab import AB_LIBRARY, COLD_BYTES, build_revision, parse_shape
from l2bn.kernels import cpp


CACHES = ("hot", "cold", "network")


def passes(shape: tuple[int, ...], with_ab: bool, cache: str = "hot"
           ) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """The ops to time at ``shape`` (channels-last, float32), by name, and what to run (untimed) before each
    call to put (x, dy) where ``cache`` says."""
    x, dy = (torch.randn(shape).contiguous(memory_format=torch.channels_last) for _ in range(2))
    C = shape[1]
    mean, invstd, w, rm, rv = torch.zeros(C), torch.ones(C), torch.ones(C), torch.zeros(C), torch.ones(C)
    ops = {
        "BN": lambda: torch.ops.aten.native_batch_norm_backward(dy, x, w, rm, rv, mean, invstd, True, 1e-5,
                                                                [False, True, True]),
        "L2BN": lambda: torch.ops.l2bn_cpu.sync_gradient_sums(dy, x, mean, invstd, 1e-12, True),
    }
    if with_ab:
        ops["REV"] = lambda: getattr(torch.ops, AB_LIBRARY).sync_gradient_sums(dy, x, mean, invstd, 1e-12, True)
    flush = torch.empty(COLD_BYTES // 4) if cache != "hot" else None

    def prepare() -> None:
        if flush is not None:
            flush.fill_(1.0)
        if cache == "network":
            dy.mul_(1.0)  # every line written again, values unchanged

    return ops, prepare


def minima_us(ops: dict[str, Callable[[], object]], threads: list[int], repeats: int,
              prepare: Callable[[], None] = lambda: None) -> dict[tuple[str, int], float]:
    """Minimum µs of each op at each thread count, blocks of 40 calls alternating, ``prepare`` before each."""
    for op in ops.values():
        op()
    best: dict[tuple[str, int], float] = {}
    for _ in range(repeats):
        for t in threads:
            torch.set_num_threads(t)
            for name, op in ops.items():
                for _ in range(40):
                    prepare()
                    start = time.perf_counter()
                    op()
                    us = (time.perf_counter() - start) * 1e6
                    best[name, t] = min(best.get((name, t), us), us)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", help="comma-separated, e.g. 128x256x8x8,128x64x16x16 (timed channels-last)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--against", metavar="REV", help="also time the kernel source at this git revision")
    parser.add_argument("--repeats", type=int, default=4, help="blocks of 40 calls of each op and thread count")
    parser.add_argument("--cache", choices=CACHES, default="hot",
                        help="(x, dy) left in the caches, both from memory, or x from memory and dy just written")
    args = parser.parse_args()
    cpp.operators()
    if args.against:
        build_revision(args.against)
    print(f"torch {torch.__version__}; minimum µs of {args.repeats} × 40 calls; channels-last float32; "
          f"cache: {args.cache}")
    print("| shape | threads | BN sums | L2BN moments | ratio |" + (f" {args.against} | its ratio | equal |"
                                                                     if args.against else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|---:|---|" if args.against else ""))
    for spec in args.shapes.split(","):
        shape, _ = parse_shape(spec)
        ops, prepare = passes(shape, bool(args.against), args.cache)
        equal = args.against and all(torch.equal(a, b) for a, b in zip(ops["L2BN"](), ops["REV"]()))
        best = minima_us(ops, args.threads, args.repeats, prepare)
        for t in args.threads:
            bn, l2 = best["BN", t], best["L2BN", t]
            row = f"| {spec} | {t} | {bn:.1f} | {l2:.1f} | {l2 / bn:.2f} |"
            if args.against:
                row += f" {best['REV', t]:.1f} | {best['REV', t] / bn:.2f} | {'yes' if equal else 'no'} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
