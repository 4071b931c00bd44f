"""torch.distributed set-up for ``torchrun … -m l2bn train``: process group, device checks, rank-0 helpers and
the run's ``--sync-bn`` conversion.

Reads the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``);
without it everything runs as a single process. NCCL on CUDA, gloo otherwise (so CPU DDP works too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from ..convert import BN_TO_L2BN, swap_modules

__all__ = ["DistEnv", "all_reduce_sum", "barrier", "check_device", "cleanup_distributed", "resolve_device",
           "setup_distributed", "sync_norms"]


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


def check_device(device: str) -> torch.device:
    """The device ``device`` names, if it exists on this machine; else ``ValueError`` naming what is accepted."""
    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps ({exc})") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} is not available: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not available on this machine; use 'cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported; accepted: auto, cpu, cuda, cuda:N, mps")
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


_PLAIN_BN = tuple(BN_TO_L2BN)  # exactly nn.BatchNorm{1,2,3}d, the classes the converters know


def convert_plain_bn_to_sync(module: nn.Module, process_group=None) -> nn.Module:
    """torch SyncBatchNorm for exactly ``nn.BatchNorm{1,2,3}d`` (torch's own converter would also swallow
    L2BN and other ``_BatchNorm`` subclasses)."""
    return swap_modules(module, lambda name, m: nn.SyncBatchNorm.convert_sync_batchnorm(m, process_group)
                        if type(m) in _PLAIN_BN else None)


def sync_norms(model: nn.Module, device: torch.device) -> nn.Module:
    """A run's ``--sync-bn``: L2BN layers become :class:`~l2bn.distributed.SyncL2BatchNorm` (any backend),
    plain BN layers torch's SyncBatchNorm (CUDA only; elsewhere ``ValueError`` names the first one)."""
    from ..distributed import convert_sync_l2bn

    model = convert_sync_l2bn(model)
    plain = [n for n, m in model.named_modules() if type(m) in _PLAIN_BN]
    if plain:
        if device.type != "cuda":
            raise ValueError(
                f"--sync-bn: torch's SyncBatchNorm (for plain BN layers such as {plain[0]!r}) needs CUDA, got "
                f"device {device}; L2BN layers synchronise on any backend"
            )
        model = convert_plain_bn_to_sync(model)
    return model
