"""Shared model plumbing: norm resolution and recording, weight initialisation, norm replacement."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ..norms import get_norm_layer
from ..norms.registry import NormLayer
from ..surgery import swap_modules


__all__ = ["NormRecorder", "init_weights", "replace_norms", "reset_norm", "resolve_norm"]


class NormRecorder:
    """A channels-first norm constructor that remembers every layer it builds (and its channel count).

    Models built through it know exactly which of their modules are norm positions, whatever the norm
    class is; that is what lets initialisation and placement treat every norm of the zoo alike.
    """

    def __init__(self, norm_layer: NormLayer) -> None:
        self.norm_layer = norm_layer
        self.created: list[tuple[nn.Module, int]] = []
        self.keywords: dict[int, dict] = {}  # id(module) -> the keywords it was built with (e.g. affine=False)

    def __call__(self, num_features: int, *args, **kwargs) -> nn.Module:
        module = self.norm_layer(num_features, *args, **kwargs)
        self.created.append((module, num_features))
        self.keywords[id(module)] = dict(kwargs)
        return module

    @property
    def modules(self) -> list[nn.Module]:
        return [module for module, _ in self.created]


def resolve_norm(norm_layer: str | NormLayer | None) -> NormRecorder:
    """Registry name or callable (``None`` means BatchNorm) → a :class:`NormRecorder` around it."""
    return NormRecorder(get_norm_layer("bn" if norm_layer is None else norm_layer))


def reset_norm(module: nn.Module) -> None:
    """Put a norm layer in its initial state: its own ``reset_parameters()`` if it has one, otherwise
    weight = 1 and bias = 0 on its direct parameters and ``reset_parameters()`` on its sub-modules."""
    if callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
        return
    with torch.no_grad():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(weight, torch.Tensor):
            weight.fill_(1.0)
        if isinstance(bias, torch.Tensor):
            bias.zero_()
    for child in module.children():
        for sub in child.modules():
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()


def init_weights(model: nn.Module, norms: Iterable[nn.Module]) -> None:
    """He et al. (2015) normal init (fan-out, ReLU gain) for every convolution, zero conv biases, and a
    reset of every norm layer in ``norms`` — BatchNorm or not (torchvision's loops only know BN/GN)."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for norm in norms:
        reset_norm(norm)


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def replace_norms(
    model: nn.Module, recorder: NormRecorder, norm_layer: NormLayer, prefixes: Sequence[str]
) -> list[str]:
    """Swap the recorded norm layers that live under any of ``prefixes`` for fresh ``norm_layer`` ones.

    New layers are built with the old one's keywords (e.g. ``affine=False``), take its ``eps`` and
    ``momentum`` where both have them, are reset and moved to its device and dtype. Returns the replaced names.
    """
    channels = {id(module): num for module, num in recorder.created}
    replaced: list[str] = []

    def replace(name: str, old: nn.Module) -> nn.Module | None:
        if id(old) not in channels or not _matches(name, prefixes):
            return None
        new = norm_layer(channels[id(old)], **recorder.keywords.get(id(old), {}))
        for attr in ("eps", "momentum"):
            if isinstance(getattr(old, attr, None), float) and isinstance(getattr(new, attr, None), float):
                setattr(new, attr, getattr(old, attr))
        tensor = next(iter(old.parameters()), None)
        if tensor is not None:
            new = new.to(device=tensor.device, dtype=tensor.dtype)
        new.train(old.training)
        reset_norm(new)
        replaced.append(name)
        return new

    swap_modules(model, replace)
    return replaced
