"""l2bn: L2BN (Wang et al.) — batch normalization on per-sample l2-equalised features.

The layers, converters and the functional op are imported here; the subpackages (``l2bn.norms``,
``l2bn.models``, ``l2bn.metrics``, ``l2bn.data``, ``l2bn.train``, ``l2bn.lightning_sync`` (needs lightning), …) and
the timm layer ``l2bn.L2BatchNormAct2d`` and ``l2bn.create_timm_model`` load on first attribute access.
"""
from __future__ import annotations

import importlib
from typing import Any

from .convert import convert_to_bn, convert_to_l2bn, swap_modules
from .distributed import SyncL2BatchNorm, convert_sync_l2bn, revert_sync_l2bn
from .functional import l2_batch_norm
from .layers import FrozenL2BatchNorm2d, L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "FrozenL2BatchNorm2d",
    "L2BatchNorm1d",
    "L2BatchNorm2d",
    "L2BatchNorm3d",
    "SyncL2BatchNorm",
    "convert_sync_l2bn",
    "revert_sync_l2bn",
    "convert_to_bn",
    "convert_to_l2bn",
    "l2_batch_norm",
    "swap_modules",
]

_SUBMODULES = (
    "bench", "cli", "data", "functional", "geometry", "kernels", "lightning_sync", "metrics", "models", "norm_act",
    "norms", "report", "surgery", "timm_model", "train",
)


def __getattr__(name: str) -> Any:
    """Import subpackages (and ``L2BatchNormAct2d``, ``create_timm_model``, which need timm) on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "L2BatchNormAct2d":
        return importlib.import_module(".norm_act", __name__).L2BatchNormAct2d
    if name == "create_timm_model":
        return importlib.import_module(".timm_model", __name__).create_timm_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
