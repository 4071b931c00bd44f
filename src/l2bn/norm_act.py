"""L2BN for timm's norm + activation layers (needs ``pip install timm``, the ``timm`` extra).

timm's EfficientNet, MobileNetV3, RegNet, CSPNet, ReXNet, … build their norms as ``BatchNormAct2d``
(BatchNorm2d plus drop and activation in one module). :class:`L2BatchNormAct2d` is its L2BN counterpart
(and :class:`FrozenL2BatchNormAct2d` that of ``FrozenBatchNormAct2d``),
and importing this module registers L2BN with timm's norm factories, so that
``timm.create_model(name, norm_layer=l2bn.L2BatchNorm2d)`` (or ``norm_layer="l2batchnorm"``) builds L2BN
norm-act layers with each model's own activation. :func:`l2bn.convert_to_l2bn` converts existing
``BatchNormAct2d`` and ``FrozenBatchNormAct2d`` layers (keeping their drop and activation modules).

timm has no public registry for norm layers; the registration adds entries to the (private) name and type
tables of ``timm.layers.create_norm`` and ``timm.layers.create_norm_act``, which tests/test_compat_timm.py
checks against the installed timm.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from timm.layers import create_act_layer
from timm.layers import create_norm as timm_create_norm
from timm.layers import create_norm_act as timm_create_norm_act
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d
from torch import Tensor

from .layers import FrozenL2BatchNorm2d, L2BatchNorm2d
from .surgery import rebuild_norm

__all__ = ["FrozenL2BatchNormAct2d", "L2BatchNormAct2d", "register_with_timm", "timm_batchnorm_act", "timm_conversions"]


class L2BatchNormAct2d(L2BatchNorm2d, BatchNormAct2d):
    """L2BN then drop then activation over (N, C, H, W) input — timm's ``BatchNormAct2d`` with the l2 step.

    Takes ``BatchNormAct2d``'s arguments (``apply_act``, ``act_layer``, ``act_kwargs``, ``inplace``,
    ``drop_layer``, …) plus ``rescale`` and ``l2_eps``; same state_dict keys, so timm checkpoints load.
    An instance of both :class:`l2bn.L2BatchNorm2d` and timm's ``BatchNormAct2d``.

    Shape:
        input (N, C, H, W); output the same shape.

    Example::

        >>> layer = L2BatchNormAct2d(8, act_layer="silu")
        >>> layer.act
        SiLU(inplace=True)
        >>> layer(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Any = nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rescale: bool = True,
        l2_eps: float = 1e-12,
    ) -> None:
        L2BatchNorm2d.__init__(
            self, num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
            rescale=rescale, l2_eps=l2_eps,
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act = create_act_layer(act_layer, **{"inplace": inplace, **(act_kwargs or {})}) if apply_act else None
        self.act = nn.Identity() if act is None else act

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(L2BatchNorm2d.forward(self, input)))


class FrozenL2BatchNormAct2d(FrozenL2BatchNorm2d):
    """Frozen L2BN then drop then activation over (N, C, H, W) input — timm's ``FrozenBatchNormAct2d`` with the
    l2 step. Same buffers and state_dict keys; ``drop`` and ``act`` modules as timm's.

    Shape:
        input (N, C, H, W); output the same shape.

    Example::

        >>> layer = FrozenL2BatchNormAct2d(8, act_layer="silu")
        >>> layer(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        apply_act: bool = True,
        act_layer: Any = nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rescale: bool = True,
        l2_eps: float = 1e-12,
    ) -> None:
        super().__init__(num_features, eps, device=device, dtype=dtype, rescale=rescale, l2_eps=l2_eps)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act = create_act_layer(act_layer, **{"inplace": inplace, **(act_kwargs or {})}) if apply_act else None
        self.act = nn.Identity() if act is None else act

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(FrozenL2BatchNorm2d.forward(self, input)))


def _keep_drop_and_act(old: nn.Module, new: nn.Module) -> nn.Module:
    new.drop, new.act = old.drop, old.act
    return new


Conversion = tuple[type[nn.Module], type[nn.Module], Callable[..., nn.Module], Callable[[nn.Module], nn.Module]]


def timm_conversions() -> list[Conversion]:
    """(timm class, L2BN class, to-L2BN rule, to-timm rule) for :func:`l2bn.convert.register_conversion`:
    ``BatchNormAct2d`` ↔ :class:`L2BatchNormAct2d`, ``FrozenBatchNormAct2d`` ↔ :class:`FrozenL2BatchNormAct2d`."""
    return [
        (
            BatchNormAct2d, L2BatchNormAct2d,
            lambda old, options: _keep_drop_and_act(old, rebuild_norm(old, L2BatchNormAct2d, apply_act=False, **options)),
            lambda old: _keep_drop_and_act(old, rebuild_norm(old, BatchNormAct2d, apply_act=False)),
        ),
        (
            FrozenBatchNormAct2d, FrozenL2BatchNormAct2d,
            lambda old, options: _keep_drop_and_act(old, FrozenL2BatchNormAct2d.from_frozen(old, apply_act=False, **options)),
            lambda old: _keep_drop_and_act(old, old.to_frozen(FrozenBatchNormAct2d, apply_act=False)),
        ),
    ]


def timm_batchnorm_act() -> type[nn.Module]:
    """timm's ``BatchNormAct2d`` (the class :func:`l2bn.convert_to_l2bn` converts)."""
    return BatchNormAct2d


def register_with_timm() -> None:
    """Make timm's ``get_norm_layer`` / ``get_norm_act_layer`` resolve L2BN: by the names ``"l2batchnorm"``
    and ``"l2batchnorm2d"``, by the class :class:`l2bn.L2BatchNorm2d` (→ :class:`L2BatchNormAct2d` where a
    model wants norm + act) and by :class:`L2BatchNormAct2d` itself. Idempotent; run on import."""
    for name in ("l2batchnorm", "l2batchnorm2d"):
        timm_create_norm._NORM_MAP[name] = L2BatchNorm2d
        timm_create_norm_act._NORM_ACT_MAP[name] = L2BatchNormAct2d
    timm_create_norm._NORM_TYPES.add(L2BatchNorm2d)
    timm_create_norm_act._NORM_ACT_TYPES.add(L2BatchNormAct2d)
    timm_create_norm_act._NORM_ACT_REQUIRES_ARG.add(L2BatchNormAct2d)  # takes the model's act_layer
    timm_create_norm_act._NORM_TO_NORM_ACT_MAP[L2BatchNorm2d.__name__.lower()] = L2BatchNormAct2d


register_with_timm()
