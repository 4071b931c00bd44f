"""GPU time alone: BatchNorm2d against L2BatchNorm2d with each call captured in a CUDA graph and replayed, so
that no host (Python, launch) time enters — the device side of issue 23's goal 4 (≥ 80 % of HBM bandwidth at
ResNet-50 shapes, ≤ 1.10× BN). ``l2bn bench`` and the census time whole calls (host and device).

    python benchmarks/bench_cuda_graphs.py --dtype fp32 bf16 [--shapes 128x64x56x56 ...] [--replays 50]

Prints per shape, layout and mode the minimum replay time of each layer (ms), their ratio, L2BN's achieved
GB/s (``l2bn.bench.PASSES`` full passes), and a same-shape device copy's GB/s (read + write) measured alike.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from l2bn import L2BatchNorm2d
from l2bn.bench import achieved_gbps, layer_steps

RESNET50_SHAPES = ["128x64x56x56", "128x256x56x56", "128x512x28x28", "128x2048x7x7"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def graph_ms(step, replays: int) -> float:
    """Minimum time (ms, CUDA events) of one replay of ``step`` captured as a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the capture (kernel compilation, cuDNN plans, allocator)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


def copy_gbps(x: torch.Tensor, replays: int) -> float:
    out = torch.empty_like(x)
    ms = graph_ms(lambda: out.copy_(x), replays)
    return 2 * x.numel() * x.element_size() / (ms * 1e6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=RESNET50_SHAPES)
    parser.add_argument("--dtype", nargs="*", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--replays", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda_graphs: needs a CUDA device", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; CUDA graphs, min of {args.replays}")
    print("| dtype | shape | layout | mode | BN ms | L2BN ms | ratio | L2BN GB/s | copy GB/s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for text in args.shapes:
            shape = tuple(int(v) for v in text.split("x"))
            for channels_last in (False, True):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                x = torch.randn(*shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                copy = copy_gbps(x, args.replays)
                for mode in ("train", "eval"):
                    layers = [cls(shape[1], device="cuda", dtype=dtype) for cls in (nn.BatchNorm2d, L2BatchNorm2d)]
                    try:
                        bn_ms, l2bn_ms = (graph_ms(step, args.replays) for step in layer_steps(layers, x, mode))
                    except RuntimeError as error:  # a capture that fails is reported, not fatal
                        print(f"| {dtype_name} | {text} | {'cl' if channels_last else 'NCHW'} | {mode} | "
                              f"capture failed: {str(error).splitlines()[0][:120]} |")
                        continue
                    gbps = achieved_gbps(shape, mode, x.element_size(), l2bn_ms)
                    print(f"| {dtype_name} | {text} | {'channels_last' if channels_last else 'NCHW'} | {mode} | "
                          f"{bn_ms:.3f} | {l2bn_ms:.3f} | {l2bn_ms / bn_ms:.2f} | {gbps:.0f} | {copy:.0f} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
