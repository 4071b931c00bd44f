"""Batch-Instance Normalization (Nam & Kim, NeurIPS 2018, arXiv 1805.07925) and its training helpers.

    y = γ ⊙ (ρ ⊙ BN(x) + (1 − ρ) ⊙ IN(x)) + β,    ρ ∈ [0, 1]^C  (parameter ``gate``, initialised to 1)
BN and IN here are without affine; BN keeps running statistics (torch convention), IN always uses the
current sample. As in the authors' recipe, ``gate`` must be clipped to [0, 1] after every optimizer step
(:func:`clip_gates_`) and is trained with 10× the learning rate and no weight decay (:func:`param_groups`).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._utils import BatchNormNd, check_rank, check_spatial_size, factory_kwargs

__all__ = ["BatchInstanceNorm", "clip_gates_", "gate_parameters", "param_groups"]


class BatchInstanceNorm(nn.Module):
    """BIN over (N, C, L), (N, C, H, W), ... input with a per-channel gate between BN and IN."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = factory_kwargs(device, dtype)
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.bn = BatchNormNd(num_features, eps=eps, momentum=momentum, affine=False, **fk)
        self.gate = nn.Parameter(torch.empty(num_features, **fk))
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **fk))
            self.bias = nn.Parameter(torch.empty(num_features, **fk))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.bn.reset_parameters()
        nn.init.ones_(self.gate)
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_rank(input, name, min_dim=3)
        check_spatial_size(input, name)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        gate = self.gate.view(shape)
        out_in = F.group_norm(input, self.num_features, eps=self.eps)
        out = gate * self.bn(input) + (1 - gate) * out_in
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


def gate_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every BIN ``gate`` parameter in ``model``."""
    for module in model.modules():
        if isinstance(module, BatchInstanceNorm):
            yield module.gate


def param_groups(model: nn.Module, lr: float, weight_decay: float, *, gate_lr_scale: float = 10.0) -> list[dict]:
    """Optimizer parameter groups: BIN gates with ``gate_lr_scale``× lr and no weight decay, the rest as given.

    Pass the result to any ``torch.optim`` optimizer; empty groups are left out. Parameters with
    ``requires_grad=False`` are skipped.
    """
    gate_ids = {id(p) for p in gate_parameters(model)}
    gates, others = [], []
    for p in model.parameters():
        if p.requires_grad:
            (gates if id(p) in gate_ids else others).append(p)
    groups = []
    if others:
        groups.append({"params": others, "lr": lr, "weight_decay": weight_decay})
    if gates:
        groups.append({"params": gates, "lr": lr * gate_lr_scale, "weight_decay": 0.0})
    return groups


@torch.no_grad()
def clip_gates_(model: nn.Module) -> None:
    """Clamp every BIN gate of ``model`` to [0, 1] in place; call after each optimizer step."""
    for gate in gate_parameters(model):
        gate.clamp_(0.0, 1.0)
