"""The training forward pass and its loss, with mixup (one λ a batch, or one a sample) when the recipe asks."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["forward_loss", "mixup_per_sample"]


def forward_loss(model: nn.Module, x: Tensor, y: Tensor, criterion: nn.Module,
                 mixup: torch.distributions.Beta | None, per_sample: bool = False) -> tuple[Tensor, Tensor]:
    """Logits and loss of ``model`` on ``(x, y)``; with ``mixup`` (the Beta distribution of λ), on a mixed batch."""
    if mixup is None:
        logits = model(x)
        return logits, criterion(logits, y)
    if per_sample:
        return mixup_per_sample(model, x, y, criterion, mixup)
    lam = float(mixup.sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    logits = model(lam * x + (1.0 - lam) * x[perm])
    return logits, lam * criterion(logits, y) + (1.0 - lam) * criterion(logits, y[perm])


def mixup_per_sample(model: nn.Module, x: Tensor, y: Tensor, criterion: nn.Module,
                     mixup: torch.distributions.Beta) -> tuple[Tensor, Tensor]:
    """Mixup with one λ per sample (Hu et al.'s generator): x_i ← λ_i x_i + (1 − λ_i) x_π(i) and the loss
    λ_i CE(y_i) + (1 − λ_i) CE(y_π(i)) averaged over the batch (cross-entropy with the mixed one-hot labels)."""
    lam = mixup.sample((x.shape[0],)).to(x.device)
    perm = torch.randperm(x.shape[0], device=x.device)
    mixed = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    logits = model(mixed * x + (1.0 - mixed) * x[perm])
    per_sample = criterion.__class__(reduction="none", label_smoothing=criterion.label_smoothing)
    loss = lam * per_sample(logits, y) + (1.0 - lam) * per_sample(logits, y[perm])
    return logits, loss.mean()
