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

``--launches`` then times each Triton launch of the L2BN calls, per kernel: launches a call, host µs a launch
through ``l2bn.kernels.triton_launch.launch``, and of that the part Triton's binder takes (the function that
types the arguments and picks the compiled variant, timed in a call of its own just before each launch; "—"
where there is none, as in the interpreter) — what decides whether the next cut is the binder, the launcher or
the Python around them.
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


class LaunchTimes:
    """Per kernel: launches, seconds in ``launch`` and seconds in Triton's binder (None: no binder)."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.binder: dict[str, float | None] = {}

    def add(self, name: str, seconds: float, binder: float | None) -> None:
        self.count[name] = self.count.get(name, 0) + 1
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.binder[name] = None if binder is None else (self.binder.get(name) or 0.0) + binder


def binder_seconds(kernel: object, args: tuple, constexprs: dict) -> float | None:
    """Seconds of one call of ``kernel``'s Triton binder on these arguments (None where it has none)."""
    from l2bn.kernels.triton_launch import binder

    bind = binder(kernel)
    if bind is None:
        return None
    start = time.perf_counter()
    bind(*args, **constexprs)
    return time.perf_counter() - start


@contextlib.contextmanager
def launches_timed(times: LaunchTimes) -> Iterator[None]:
    """Every Triton launch of the L2BN path timed into ``times`` while inside (the launches still run)."""
    import l2bn.kernels.triton_l2bn as kernels

    saved = kernels.launch

    def timed(kernel, grid, *args, **constexprs):
        binder = binder_seconds(kernel, args, constexprs)
        start = time.perf_counter()
        saved(kernel, grid, *args, **constexprs)
        seconds = time.perf_counter() - start
        times.add(getattr(kernel, "__name__", "?"), seconds, binder)

    kernels.launch = timed
    try:
        yield
    finally:
        kernels.launch = saved


def launch_rows(spec: str, mode: str, step: Callable[[], None], calls: int) -> list[str]:
    """Markdown rows of ``--launches`` for one shape and mode: ``calls`` calls after 10 untimed ones."""
    for _ in range(10):
        step()
    times = LaunchTimes()
    with launches_timed(times):
        for _ in range(calls):
            step()
    rows = []
    for name, count in times.count.items():
        binder = times.binder[name]
        binder_cell = "—" if binder is None else f"{binder / count * 1e6:.1f}"
        rows.append(f"| {spec} | {mode} | {name} | {count / calls:g} | {times.seconds[name] / count * 1e6:.1f} | "
                    f"{binder_cell} |")
    return rows


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
    parser.add_argument("--launches", action="store_true", help="also time each Triton launch, per kernel")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.environ[IMPL_ENV_VAR] = "triton"  # the layers' path on CUDA; on the CPU, through the interpreter
    print(environment_line(device) + f"; {args.calls} calls back to back, µs a call (host loop / wall)")
    print("| shape | mode | BN | L2BN (Triton) | L2BN wrapper, no launch | Triton launches (difference) |")
    print("|---|---|---:|---:|---:|---:|")
    launches: list[str] = []
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
        if args.launches:
            launches.extend(launch_rows(spec, mode, l2bn, args.calls))
    if args.launches:
        print("\nEach Triton launch of those L2BN calls, host µs (binder: Triton's, timed apart before each launch)")
        print("| shape | mode | kernel | launches a call | µs a launch | of which binder |")
        print("|---|---|---|---:|---:|---:|")
        print("\n".join(launches), flush=True)


if __name__ == "__main__":
    main()
