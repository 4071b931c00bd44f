"""Divergence on demand for the runner's tests: a model wrapper whose training forwards turn to NaN."""
import torch.nn as nn


class NaNAfter(nn.Module):
    """Wraps a model and returns NaN logits from the ``k``-th training forward on."""

    def __init__(self, inner: nn.Module, k: int) -> None:
        super().__init__()
        self.inner, self.k, self.calls = inner, k, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.k:
                return out * float("nan")
        return out
