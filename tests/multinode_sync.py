"""One forward/backward of a SyncL2BatchNorm model on this rank's share of a fixed batch (or, without torchrun, on
the whole batch); saves the synchronized running statistics and the first step's gradients to OUT/rank<r>.pt.

Run by tests/test_multinode.py: ``torchrun --nnodes 2 --nproc-per-node 1 ... multinode_sync.py OUT MODEL``."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import l2bn
from l2bn.models import create_model

BATCH = 8


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mini":
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))
    return create_model(name, num_classes=10)


def main(out: str, name: str) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = l2bn.convert_sync_l2bn(l2bn.convert_to_l2bn(build(name))).double().train()
    torch.manual_seed(1)
    size = 8 if name == "mini" else 16
    x, y = torch.randn(BATCH, 3, size, size, dtype=torch.float64), torch.arange(BATCH) % 10
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = nn.functional.cross_entropy(model(x[share]), y[share], reduction="sum") / BATCH
    loss.backward()
    state = {k: v for k, v in model.state_dict().items() if "running" in k}
    grads = {k: p.grad for k, p in model.named_parameters()}
    torch.save({"running": state, "grads": grads, "world": world}, os.path.join(out, f"rank{rank}.pt"))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
