"""Host time of one layer call on a GPU: BatchNorm's, L2BN's through the Triton kernels, and L2BN's wrapper alone.

    python benchmarks/bench_host.py [--device cuda] [--shapes 128x16x32x32,32x64x8x8] [--calls 200] [--modes train,eval]

At small shapes a GPU finishes each kernel before the host has launched the next, so a call costs its host time
(issue 23, goal 4). Each row runs ``--calls`` calls back to back — training (forward + backward) or eval (a
forward under no_grad: L2BN's inference path) — the device synchronised only before and after the loop, and
prints the host's time a call (the loop) and the wall time a call (to the final synchronisation): BatchNorm2d,
L2BatchNorm2d through the Triton kernels, and the same with every Triton launch replaced by a no-op — the
wrapper's allocations, autograd node and Python, nothing launched. The difference between the last two is the
launches' share (8 or more a training call, 2 an inference call: Triton's binder and the launcher,
`l2bn.kernels.triton_launch.launch`). On the CPU
(``TRITON_INTERPRET=1`` set before the import) only BatchNorm and the stubbed wrapper are timed: the interpreter's
launches are no measure of a GPU's.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import time
from typing import Callable, Iterator

import torch
import torch.nn as nn

from l2bn.bench import environment_line, synchronize
from l2bn.functional import IMPL_ENV_VAR
from l2bn.layers import L2BatchNorm2d


@contextlib.contextmanager
def launches_stubbed() -> Iterator[None]:
    """Every Triton kernel of the L2BN path launches nothing while inside."""
    import l2bn.kernels.triton_l2bn as kernels

    saved = kernels.launch
    kernels.launch = lambda *args, **kwargs: None
    try:
        yield
    finally:
        kernels.launch = saved


def host_and_wall_us(step: Callable[[], None], calls: int, device: torch.device) -> tuple[float, float]:
    """(host µs, wall µs) a call over ``calls`` back-to-back calls, after 10 warm-up calls."""
    for _ in range(10):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    host = time.perf_counter() - start
    synchronize(device)
    wall = time.perf_counter() - start
    return host / calls * 1e6, wall / calls * 1e6


def training_call(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    xg, grad = x.detach().requires_grad_(), torch.randn_like(x)

    def step() -> None:
        layer(xg).backward(grad)
        xg.grad = None

    return step


def eval_call(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    layer.eval()

    def step() -> None:
        with torch.no_grad():
            layer(x)

    return step


CALLS = {"train": training_call, "eval": eval_call}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="128x16x32x32,128x64x8x8,32x256x28x28")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--modes", default="train,eval", help="comma-separated: train, eval")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.environ[IMPL_ENV_VAR] = "triton"  # the layers' path on CUDA; on the CPU, through the interpreter
    print(environment_line(device) + f"; {args.calls} calls back to back, µs a call (host loop / wall)")
    print("| shape | mode | BN | L2BN (Triton) | L2BN wrapper, no launch | Triton launches (difference) |")
    print("|---|---|---:|---:|---:|---:|")
    for spec, mode in itertools.product(args.shapes.split(","), args.modes.split(",")):
        x = torch.randn(*(int(v) for v in spec.split("x")), device=device)
        bn = CALLS[mode](nn.BatchNorm2d(x.shape[1], device=device), x)
        l2bn = CALLS[mode](L2BatchNorm2d(x.shape[1], device=device), x)
        bn_us = host_and_wall_us(bn, args.calls, device)
        full_us = host_and_wall_us(l2bn, args.calls, device) if device.type == "cuda" else None
        with launches_stubbed():
            wrapper_us = host_and_wall_us(l2bn, args.calls, device)
        cells = [f"{bn_us[0]:.0f} / {bn_us[1]:.0f}", "—", f"{wrapper_us[0]:.0f} / {wrapper_us[1]:.0f}", "—"]
        if full_us is not None:
            cells[1] = f"{full_us[0]:.0f} / {full_us[1]:.0f}"
            cells[3] = f"{full_us[0] - wrapper_us[0]:.0f}"
        print(f"| {spec} | {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
