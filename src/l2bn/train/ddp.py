"""torch.distributed set-up for ``torchrun … -m l2bn train``: process group, device, rank-0 helpers.

Reads the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``);
without it everything runs as a single process. NCCL on CUDA, gloo otherwise (so CPU DDP works too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistEnv", "setup_distributed", "cleanup_distributed", "resolve_device", "all_reduce_sum", "barrier"]


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of this process; ``is_main`` is rank 0, the only rank that writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` when CUDA is available, else ``mps`` when available, else ``cpu``."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def setup_distributed(device: str | torch.device | None = "auto") -> DistEnv:
    """Join the process group described by torchrun's environment (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistEnv(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        created = True
    return DistEnv(rank, world_size, local_rank, dev, created)


def cleanup_distributed(env: DistEnv) -> None:
    """Destroy the process group if :func:`setup_distributed` created it."""
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
