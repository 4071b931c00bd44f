"""Pieces shared by the zoo's layers: rank checks and a rank-agnostic BatchNorm used inside composites."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


def check_rank(input: Tensor, layer: str, *, min_dim: int = 2) -> None:
    """Raise a ``ValueError`` naming ``layer`` if ``input`` is not channels-first with ``min_dim`` dims or more."""
    if input.dim() < min_dim:
        wanted = "(N, C, *)" if min_dim <= 2 else "(N, C, L), (N, C, H, W), ... (at least one spatial dim)"
        raise ValueError(f"{layer} expects input of shape {wanted}, got {input.dim()}D input {tuple(input.shape)}")


def check_spatial_size(input: Tensor, layer: str) -> None:
    """Instance statistics need more than one value per (sample, channel); raise a ``ValueError`` otherwise."""
    if input[0, 0].numel() <= 1:
        raise ValueError(
            f"{layer} needs more than 1 spatial value per (sample, channel) for instance statistics, "
            f"got input of shape {tuple(input.shape)}"
        )


class BatchNormNd(_BatchNorm):
    """torch's BatchNorm for any channels-first input (N, C, *) — the BN step inside composite layers.

    A ``_BatchNorm`` subclass, so ``nn.SyncBatchNorm.convert_sync_batchnorm`` synchronises it too.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        check_rank(input, type(self).__name__)


def factory_kwargs(device: torch.device | str | None, dtype: torch.dtype | None) -> dict:
    """The ``device``/``dtype`` pair as keyword arguments for tensor and module constructors."""
    return {"device": device, "dtype": dtype}
