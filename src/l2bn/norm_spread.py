"""How unequal the per-sample l2 norms are where they enter each normalization layer — the quantity L2BN equalises.

The paper's argument (section 3) is that samples whose feature maps differ in overall length pull BatchNorm's
statistics unevenly. :class:`NormSpread` measures that spread while a model trains: at the input ``x`` of every
normalization layer, the coefficient of variation across the batch of the per-sample norms,
``CV = std_n(‖x_n‖₂) / mean_n(‖x_n‖₂)`` (sample std), averaged over the training steps it saw.

Example::

    spread = NormSpread(model)
    with spread:
        for x, y in loader:
            loss_fn(model(x), y).backward()
    spread.summary()   # {"layer1.0.bn1": 0.21, ...}; the mean CV of each layer since the last summary
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["NormSpread", "normalization_layers"]

_TORCH_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _TORCH_NORMS) or type(module).__module__.startswith("l2bn.norms.")


def normalization_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost normalization layers of ``model`` by qualified name (a zoo layer built from BatchNorm counts
    once, not with its parts): torch's norms, L2BN (a ``_BatchNorm``) and every layer of ``l2bn.norms``."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if _is_norm(module) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found


class NormSpread:
    """Per-layer mean CV of the per-sample input norms over the training-mode forwards seen (a context manager
    that installs forward pre-hooks; evaluation-mode forwards are not counted)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = normalization_layers(model)
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def record(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            if not module.training or x.shape[0] < 2:
                return
            with torch.no_grad():
                norms = torch.linalg.vector_norm(x.detach().flatten(1), dim=1, dtype=torch.float32)
                cv = norms.std() / norms.mean()
            self._sums[name] = self._sums[name] + cv if name in self._sums else cv
            self._counts[name] = self._counts.get(name, 0) + 1
        return record

    def __enter__(self) -> "NormSpread":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def summary(self) -> dict[str, float]:
        """The mean CV of each layer since the last summary (layers that saw no training batch are left out),
        and a fresh start."""
        out = {name: float(self._sums[name]) / self._counts[name] for name in self.layers if name in self._sums}
        self._sums, self._counts = {}, {}
        return out
