"""``l2bn bench``: time L2BatchNorm2d against torch's BatchNorm2d on given shapes (ratios in one run)."""
from __future__ import annotations

import argparse
import os

import torch

from ..bench import DEFAULT_SHAPES, DTYPES, environment_line, format_table, time_layers
from ..functional import IMPL_ENV_VAR, IMPLEMENTATIONS


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"NxCxHxW"`` → four positive ints with at least two values per channel (BatchNorm needs them)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"--shapes wants NxCxHxW with four positive integers, e.g. 128x64x8x8; got {text!r}")
    if shape[0] * shape[2] * shape[3] < 2:
        raise ValueError(f"--shapes {text!r} has one value per channel (N·H·W = 1); BatchNorm needs at least 2")
    return shape


def run_bench(args: argparse.Namespace) -> int:
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else list(DEFAULT_SHAPES)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"unknown device {args.device!r}; accepted: cpu, cuda, cuda:N, mps") from None
    if args.impl == "triton" and (device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(f"--impl triton needs a CUDA device (--device cuda), got device {args.device!r}"
                         + ("" if torch.cuda.is_available() else " and this machine has no CUDA"))
    if args.cuda_graphs and (device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(f"--cuda-graphs replays CUDA graphs: it needs --device cuda, got device {args.device!r}"
                         + ("" if torch.cuda.is_available() else " and this machine has no CUDA"))
    if args.impl:
        os.environ[IMPL_ENV_VAR] = args.impl
    timings = [
        time_layers(shape, mode=mode, channels_last=channels_last, device=device, dtype=DTYPES[args.dtype],
                    repeats=args.repeats, graphs=args.cuda_graphs)
        for shape in shapes for channels_last in (False, True) for mode in args.modes
    ]
    print(environment_line(device) + ("; CUDA graphs (device time)" if args.cuda_graphs else ""))
    print(format_table(timings))
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="time L2BatchNorm2d against torch's BatchNorm2d (ratios)")
    p.add_argument("--shapes", nargs="*", metavar="NxCxHxW", help="input shapes (default: the CIFAR-scale set)")
    p.add_argument("--modes", nargs="+", choices=("train", "eval"), default=["train", "eval"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--impl", choices=sorted(IMPLEMENTATIONS), help="force an L2BN implementation (default: auto)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each call from a CUDA graph: the device's time, not the host's launches")
    p.set_defaults(func=run_bench)


__all__ = ["add_command", "parse_shape", "run_bench"]
