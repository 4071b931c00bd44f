"""Layer benchmark: L2BN against torch's BatchNorm measured in the same run (the ``l2bn bench`` command)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .functional import impl_name
from .layers import L2BatchNorm2d

DEFAULT_SHAPES: tuple[tuple[int, int, int, int], ...] = ((128, 16, 32, 32), (128, 64, 8, 8), (32, 256, 28, 28))


# Full-tensor passes of the fused algorithm (reads and writes; docs/algorithm.md): training forward reads x
# twice and writes y, backward reads (x, dy), then (dy, x) and writes dx; eval reads x twice and writes y.
PASSES = {"train": 8, "eval": 3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def achieved_gbps(shape: Sequence[int], mode: str, element_size: int, ms: float) -> float:
    """The fused algorithm's memory traffic (``PASSES`` full-tensor passes) over a measured time, in GB/s: the
    figure to set against the device's peak (HBM) bandwidth."""
    return PASSES[mode] * math.prod(shape) * element_size / (ms * 1e6)


@dataclass
class Timing:
    shape: tuple[int, ...]
    channels_last: bool
    mode: str
    bn_ms: float
    l2bn_ms: float
    element_size: int = 4

    @property
    def ratio(self) -> float:
        return self.l2bn_ms / self.bn_ms

    @property
    def l2bn_gbps(self) -> float:
        """Memory traffic of the fused algorithm over L2BN's time (compare with the device's peak bandwidth)."""
        return achieved_gbps(self.shape, self.mode, self.element_size, self.l2bn_ms)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layers(
    shape: Sequence[int],
    *,
    mode: str = "train",
    channels_last: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 20,
    warmup: int = 3,
    graphs: bool = False,
) -> Timing:
    """Minimum time over interleaved repeats of BatchNorm2d and L2BatchNorm2d on one input.

    ``mode`` is "train" (forward + backward) or "eval" (forward under no_grad); ``graphs``: each call replayed
    from a CUDA graph (:func:`cuda_graphed`).
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape, device=device, dtype=dtype).to(memory_format=fmt)
    layers = [cls(shape[1], device=device, dtype=dtype) for cls in (nn.BatchNorm2d, L2BatchNorm2d)]
    steps = layer_steps(layers, x, mode)
    if graphs:
        steps = [cuda_graphed(step) for step in steps]
    bn_ms, l2bn_ms = _interleaved_min_ms(steps, device, repeats, warmup)
    return Timing(tuple(shape), channels_last, mode, bn_ms, l2bn_ms, x.element_size())


def layer_steps(layers: Sequence[nn.Module], x: torch.Tensor, mode: str) -> list[Callable[[], None]]:
    """One timed call a layer on input ``x``: forward + backward in "train" mode, a no-grad forward in "eval"."""
    grad = torch.randn_like(x)
    steps = []
    for layer in layers:
        layer.train(mode == "train")
        if mode == "train":
            xg = x.detach().requires_grad_()

            def step(layer=layer, xg=xg) -> None:
                layer(xg).backward(grad)
                xg.grad = None
        else:

            def step(layer=layer) -> None:
                with torch.no_grad():
                    layer(x)

        steps.append(step)
    return steps


def cuda_graphed(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured once as a CUDA graph (after warm-up calls on a side stream, as ``torch.cuda.graphs``
    asks); the returned callable replays it: the device's work with one host launch for all its kernels."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # kernel compilation, cuDNN plans, the allocator's blocks
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def interleaved_times_ms(steps: Sequence[Callable[[], None]], device: torch.device, repeats: int,
                         warmup: int) -> list[list[float]]:
    """Every wall time (ms) of each step over ``repeats`` rounds, the steps alternating so all see the same load."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[i].append((time.perf_counter() - start) * 1e3)
    return times


def _interleaved_min_ms(steps: Sequence[Callable[[], None]], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Minimum wall time of each step, alternating them so both see the same machine load.

    The minimum (not the median) because on a shared CPU the noise is one-sided: other processes only add time.
    """
    return [min(t) for t in interleaved_times_ms(steps, device, repeats, warmup)]


def training_step_ms(models: Sequence[nn.Module], x: Tensor, target: Tensor, *, repeats: int,
                     warmup: int = 1) -> list[float]:
    """Minimum time (ms) of one SGD step (cross-entropy, backward, update) of each model on ``(x, target)``,
    interleaved so all see the same load (for BN-vs-L2BN model benchmarks)."""
    steps = []
    for model in models:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()

        steps.append(step)
    return _interleaved_min_ms(steps, x.device, repeats, warmup)


def inference_ms(models: Sequence[nn.Module], x: Tensor, *, repeats: int, warmup: int = 1) -> list[float]:
    """Minimum time (ms) of one forward of each model on ``x`` in eval mode under ``torch.no_grad`` (the test
    pass's), interleaved as :func:`training_step_ms`."""
    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(x)
        return run

    for model in models:
        model.eval()
    return _interleaved_min_ms([forward(model) for model in models], x.device, repeats, warmup)


def format_table(timings: Sequence[Timing]) -> str:
    lines = [
        "| shape | layout | mode | BatchNorm2d ms | L2BatchNorm2d ms | ratio | L2BN GB/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for t in timings:
        layout = "channels_last" if t.channels_last else "NCHW"
        lines.append(
            f"| {'x'.join(map(str, t.shape))} | {layout} | {t.mode} | {t.bn_ms:.3f} | {t.l2bn_ms:.3f} | {t.ratio:.2f} "
            f"| {t.l2bn_gbps:.1f} |"
        )
    return "\n".join(lines)


def l2bn_path(device: str | torch.device = "cpu") -> str:
    """The implementation L2BatchNorm2d runs on ``device`` (``$L2BN_IMPL``, else what ``auto`` picks)."""
    return impl_name(None, torch.ones(2, 2, 2, 2, device=device))


def environment_line(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    return f"device: {name}; torch {torch.__version__}; L2BN path: {l2bn_path(device)}"
