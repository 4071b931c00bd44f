"""L2BN / BatchNorm time ratios at given shapes, for A/B comparisons of two kernel versions.

    python benchmarks/bench_ab.py 128x16x32x32,64x436x8x8cl [--threads 1] [--mode eval] [--blocks 4 --calls 23] [--cold]
                                  [--dtype bf16]

A shape ending in ``cl`` is timed channels-last. Per shape, BatchNorm and L2BN calls alternate (20–400 of each,
fewer for larger tensors) and the ratio of their minima and of their 25th percentiles is printed.

To compare kernel versions, ``--against REV`` builds the compiled kernel's source at git revision ``REV`` as a
second library (its operator renamed ``l2bn_cpu_ab``) and times it in the same process, its calls alternating
with BatchNorm's and the current kernel's: on this shared host separate runs move by ±0.2, and calls that
alternate see the same load. (Without it: run the script in two checkouts alternately, several times.)

``--blocks K`` times each shape K times over, each block with fresh tensors and layers (``--calls`` per block):
a kernel whose speed depends on where its buffers land in memory shows it as blocks that disagree, which one
block of alternating calls, always on the same buffers, hides (session 12's pipelined eval at 64×316×8×8:
0.83× BN in two blocks of four, 1.55–1.57× in the other two).

``--cold`` writes a 128 MiB buffer before each call (untimed): every call then reads its input from memory, as
a layer whose input was written long before does; without it, tensors of up to ~10 MiB stay in the L3 between
calls.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import time
from pathlib import Path

import torch
import torch.nn as nn

from l2bn import L2BatchNorm1d, L2BatchNorm2d
from l2bn.bench import DTYPES, layer_steps
from l2bn.functional import l2_batch_norm
from l2bn.kernels import cpp
from l2bn.kernels.dispatch import IMPLEMENTATIONS
from l2bn.kernels.overflow import rerun_rescaled_on_overflow

AB_LIBRARY = "l2bn_cpu_ab"
COLD_BYTES = 128 << 20  # --cold: written before each call, four times this host's 32 MiB L3


def parse_shape(spec: str) -> tuple[tuple[int, ...], bool]:
    """``"64x436x8x8cl"`` → ((64, 436, 8, 8), True)."""
    channels_last = spec.endswith("cl")
    return tuple(int(d) for d in spec.removesuffix("cl").split("x")), channels_last


def build_revision(rev: str) -> None:
    """Compile the kernel source at git revision ``rev`` as the library ``l2bn_cpu_ab`` and register it as the
    implementation ``"ab"`` (its own build folder, keyed by the source)."""
    relative = cpp.SOURCE.relative_to(Path(__file__).resolve().parents[1])
    text = subprocess.run(["git", "show", f"{rev}:{relative.as_posix()}"], check=True, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    text = text.replace("TORCH_LIBRARY(l2bn_cpu,", f"TORCH_LIBRARY({AB_LIBRARY},")
    folder = cpp.build_directory().parent / f"{AB_LIBRARY}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "l2bn_cpu_ab.cpp"
    if not source.exists():
        source.write_text(text)
    cpp.load_library(AB_LIBRARY, source, folder)
    op = getattr(torch.ops, AB_LIBRARY).l2_batch_norm.default

    @rerun_rescaled_on_overflow  # as l2_batch_norm_cpp: both kernels behind the same Python wrapper
    def l2_batch_norm_ab(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                         eps=1e-5, *, rescale=True, l2_eps=1e-12):
        return op(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale)

    IMPLEMENTATIONS["ab"] = l2_batch_norm_ab


class Forced(nn.Module):
    """An L2BN layer whose functional call names its implementation (``impl``), for kernel A/B timing."""

    def __init__(self, layer: nn.Module, impl: str) -> None:
        super().__init__()
        self.layer, self.impl = layer, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        return l2_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, self.training, 0.1, m.eps,
                             impl=self.impl)


def ratios(shape: tuple[int, ...], channels_last: bool, mode: str, against: bool = False,
           calls: int | None = None, cold: bool = False, dtype: torch.dtype = torch.float32) -> tuple[int, ...]:
    """(calls, BN min ms, L2BN min ms, ratio of minima, ratio of 25th percentiles), then with ``against`` the
    old kernel's min ms and ratios; ``cold``: a buffer larger than the last-level cache is written before each
    call (untimed), so every call reads its input from memory; ``dtype``: the input's and the layers'."""
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kind = (nn.BatchNorm1d, L2BatchNorm1d) if len(shape) == 2 else (nn.BatchNorm2d, L2BatchNorm2d)
    layers = [kind[0](shape[1], dtype=dtype), kind[1](shape[1], dtype=dtype)]
    if against:  # both kernels through the same Python path
        layers[1:] = [Forced(kind[1](shape[1], dtype=dtype), "cpp"), Forced(kind[1](shape[1], dtype=dtype), "ab")]
    steps = layer_steps(layers, x, mode)
    calls = calls or int(min(400, max(20, 5e7 / x.numel())))
    flush = torch.empty(COLD_BYTES // 4) if cold else None
    for _ in range(3):
        for step in steps:
            step()
    samples: list[list[float]] = [[] for _ in steps]
    for call in range(calls):
        for k in range(len(steps)):  # the order rotates: no step always follows the same one (warm caches)
            i = (k + call) % len(steps)
            if flush is not None:
                flush.fill_(call)
            start = time.perf_counter()
            steps[i]()
            samples[i].append((time.perf_counter() - start) * 1e3)
    bn, *others = (sorted(s) for s in samples)
    p25 = (calls - 1) // 4
    return calls, bn[0], *(v for l2 in others for v in (l2[0], l2[0] / bn[0], l2[p25] / bn[p25]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", help="comma-separated, e.g. 128x16x32x32,64x436x8x8cl (cl: channels-last)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=("train", "eval"), default="eval")
    parser.add_argument("--against", metavar="REV", help="also time the kernel source at this git revision")
    parser.add_argument("--blocks", type=int, default=1, help="time each shape this many times, fresh tensors each")
    parser.add_argument("--calls", type=int, default=None, help="calls of each layer per block (default: by size)")
    parser.add_argument("--cold", action="store_true", help="empty the caches before each call (input from memory)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the layers' and inputs' dtype")
    args = parser.parse_args()
    if args.blocks < 1 or (args.calls is not None and args.calls < 1):
        parser.error("--blocks and --calls must be at least 1")
    torch.set_num_threads(args.threads)
    if args.against:
        build_revision(args.against)
    for spec in args.shapes.split(","):
        for block in range(args.blocks):
            calls, bn, l2, ratio_min, ratio_p25, *old = ratios(*parse_shape(spec), args.mode, bool(args.against),
                                                               args.calls, args.cold, DTYPES[args.dtype])
            mode = args.mode if args.dtype == "fp32" else f"{args.mode} {args.dtype}"
            line = (f"{spec:>18} {mode} calls {calls:3d}  BN min {bn:.3f} L2 min {l2:.3f}  ratio min "
                    f"{ratio_min:.2f}  ratio p25 {ratio_p25:.2f}")
            if old:
                line += f"  | {args.against}: min {old[0]:.3f} ratio min {old[1]:.2f} p25 {old[2]:.2f}"
            print(line + (f"  [block {block + 1}/{args.blocks}]" if args.blocks > 1 else ""), flush=True)


if __name__ == "__main__":
    main()
