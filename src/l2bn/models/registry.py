"""Name → model builder registry, placement parsing and :func:`create_model`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch.nn as nn

from ..norms import get_norm_layer
from ._utils import NormLayer, NormRecorder, replace_norms

__all__ = ["ModelEntry", "create_model", "get_model_entry", "list_models", "register_model", "resolve_placement"]

Parts = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: ``builder(num_classes=, in_channels=, norm_layer=, **kwargs)``, the function
    naming its placement parts (part name → qualified module-name prefixes), its input kind and its
    architecture family (which training recipe it takes, e.g. ``"resnet"``; ``None``: no preset)."""

    name: str
    builder: Callable[..., nn.Module]
    parts: Callable[[nn.Module], Parts]
    kind: str
    family: str | None = None


_MODELS: dict[str, ModelEntry] = {}
_KINDS = ("cifar", "imagenet", "asc")


def register_model(
    name: str, builder: Callable[..., nn.Module], parts: Callable[[nn.Module], Parts], kind: str,
    family: str | None = None,
) -> None:
    """Register ``builder`` under a case-insensitive ``name``; ``kind`` is ``"cifar"``, ``"imagenet"`` or
    ``"asc"`` (acoustic scenes); ``family`` names its recipe family (``l2bn.train.recipes.default_recipe_name``)."""
    key = name.lower()
    if key in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    _MODELS[key] = ModelEntry(key, builder, parts, kind, family)


def list_models(kind: str | None = None) -> list[str]:
    """Registered model names, sorted; ``kind`` (``"cifar"`` / ``"imagenet"`` / ``"asc"``) filters them."""
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS} or None, got {kind!r}")
    return sorted(name for name, entry in _MODELS.items() if kind is None or entry.kind == kind)


def get_model_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of ``name``; unknown names raise an error listing the known ones."""
    key = str(name).lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[key]


def resolve_placement(placement: str, parts: Parts) -> tuple[str, ...] | None:
    """Module-name prefixes selected by ``placement``; ``None`` means every norm position.

    Grammar: ``"all"``, ``"none"``, or part names joined by ``"+"``, where a part is a key of ``parts``
    (``"stem"``, ``"stage2"``, ``"classifier"``, ...) or a stage range ``"stageA-B"`` (A < B).
    """
    text = str(placement).strip().lower()
    if text == "all":
        return None
    if text == "none":
        return ()
    stages = sorted(int(k[5:]) for k in parts if re.fullmatch(r"stage\d+", k))
    prefixes: list[str] = []
    for token in text.split("+"):
        token = token.strip()
        match = re.fullmatch(r"stage(\d+)-(\d+)", token)
        if token in parts:
            names: list[str] = [token]
        elif match and int(match[1]) < int(match[2]) and {int(match[1]), int(match[2])} <= set(stages):
            names = [f"stage{k}" for k in range(int(match[1]), int(match[2]) + 1)]
        else:
            ranges = f"stageA-B with {stages[0]} <= A < B <= {stages[-1]}" if len(stages) > 1 else "no ranges"
            raise ValueError(
                f"unknown placement {placement!r} (part {token!r}); accepted: 'all', 'none', or '+'-joined parts "
                f"from {', '.join(parts)}, {ranges}"
            )
        for part in names:
            prefixes.extend(p for p in parts[part] if p not in prefixes)
    return tuple(prefixes)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    norm_layer: str | NormLayer = "bn",
    placement: str = "all",
    base_norm_layer: str | NormLayer = "bn",
    **kwargs,
) -> nn.Module:
    """Build model ``name`` with ``norm_layer`` (registry name or channels-first callable) in the norm
    positions chosen by ``placement`` and ``base_norm_layer`` (BatchNorm) everywhere else.

    ``placement`` follows :func:`resolve_placement`, e.g. ``"all"``, ``"classifier"``, ``"stage1"``,
    ``"stage2-3"``, ``"stem+stage1"``. Extra ``kwargs`` go to the builder (e.g. ``shortcut="B"``).
    """
    entry = get_model_entry(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    target = get_norm_layer(norm_layer)
    base = NormRecorder(get_norm_layer(base_norm_layer))
    if str(placement).strip().lower() == "all":
        return entry.builder(num_classes=num_classes, in_channels=in_channels, norm_layer=target, **kwargs)
    model = entry.builder(num_classes=num_classes, in_channels=in_channels, norm_layer=base, **kwargs)
    prefixes = resolve_placement(placement, entry.parts(model))
    if prefixes:
        replace_norms(model, base, target, prefixes)
    return model
