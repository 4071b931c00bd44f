"""L2BN vs torch BatchNorm, measured in the same run: layer fwd+bwd and eval (NCHW and channels_last),
bytes saved for backward, and a ResNet-56 CIFAR-shape training step.

    python benchmarks/bench_l2bn.py [--repeats 20] [--threads N] [--impl cpp|fused|...]

Times are the minimum over interleaved repeats (see ``l2bn.bench``); ratios > 1 mean L2BN is slower.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn

from l2bn import L2BatchNorm2d
from l2bn.functional import IMPL_ENV_VAR, IMPLEMENTATIONS
from l2bn.bench import DEFAULT_SHAPES, environment_line, format_table, time_layers, training_step_ms
from l2bn.models import create_model


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``layer(x)``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


def resnet56_step_ms(repeats: int, batch: int) -> tuple[float, float]:
    """Minimum time of one SGD step of ResNet-56 (CIFAR-100 head, 32×32 input) with BN and with L2BN."""
    x = torch.randn(batch, 3, 32, 32)
    target = torch.randint(0, 100, (batch,))
    models = []
    for norm in (nn.BatchNorm2d, L2BatchNorm2d):
        torch.manual_seed(0)
        models.append(create_model("resnet56", num_classes=100, norm_layer=norm))
    bn_ms, l2_ms = training_step_ms(models, x, target, repeats=repeats)
    return bn_ms, l2_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--resnet-batch", type=int, default=128)
    parser.add_argument("--resnet-repeats", type=int, default=5)
    parser.add_argument("--impl", choices=sorted(IMPLEMENTATIONS), help="force an L2BN implementation (default: auto)")
    args = parser.parse_args()
    if args.impl:
        os.environ[IMPL_ENV_VAR] = args.impl
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment_line("cpu"))
    timings = [
        time_layers(shape, mode=mode, channels_last=cl, repeats=args.repeats)
        for shape in DEFAULT_SHAPES
        for cl in (False, True)
        for mode in ("train", "eval")
    ]
    print(format_table(timings))
    print("\n| shape | BatchNorm2d saved bytes | L2BatchNorm2d saved bytes | ratio |\n|---|---:|---:|---:|")
    for shape in DEFAULT_SHAPES:
        x = torch.randn(*shape, requires_grad=True)
        bn, l2 = saved_bytes(nn.BatchNorm2d(shape[1]), x), saved_bytes(L2BatchNorm2d(shape[1]), x)
        print(f"| {'x'.join(map(str, shape))} | {bn} | {l2} | {l2 / bn:.4f} |")
    bn_ms, l2_ms = resnet56_step_ms(args.resnet_repeats, args.resnet_batch)
    print(f"\nResNet-56 training step, batch {args.resnet_batch}: BN {bn_ms:.1f} ms, L2BN {l2_ms:.1f} ms, ratio {l2_ms / bn_ms:.2f}")


if __name__ == "__main__":
    main()
