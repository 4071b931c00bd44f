"""Acoustic scene classification CNNs of the paper's Table 6, on (N, 3, mel bins, frames) log-mel inputs.

- ``asc_resnet17``: McDonnell & Gao (ICASSP 2020), the two-path pre-activation ResNet as in the L2BN paper's
  Keras port (Ingrid725/ASC_L2BN, ``resnet/resnet.py``) and McDonnell-Lab's DCASE code.
- ``fcnn`` / ``fsfcnn``: Hu et al. (DCASE 2020), MihawkHu/DCASE2020_task1 ``task1a/10class/fcnn/fcnn_att.py``
  and ``fsfcnn/fsfcnn_att.py`` with their ``attention_layer.py``.

Every norm goes through ``norm_layer`` (torchvision's contract): affine positions call ``norm_layer(C)``,
the reference's parameter-free ones ``norm_layer(C, affine=False)``. Norms get Keras's defaults (``eps`` 1e-3,
running-average momentum 0.01 in torch's convention) where they have those attributes. TensorFlow's "same"
padding (extra zero after, not before, when the total is odd) is reproduced for strided convolutions and
pools. Layer tables and deliberate differences: docs/models.md.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._utils import NormLayer, NormRecorder, reset_norm, resolve_norm

__all__ = [
    "AscResNet17",
    "ChannelAttention",
    "FCNN",
    "SameConv2d",
    "SamePool2d",
    "asc_parts",
    "asc_resnet17",
    "fcnn",
    "fsfcnn",
]

KERAS_EPS, KERAS_MOMENTUM = 1e-3, 0.01


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding of one axis: output ceil(size / stride), the odd extra zero at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> Tensor:
    top, bottom = _same_pad(x.shape[-2], kernel[0], stride[0])
    left, right = _same_pad(x.shape[-1], kernel[1], stride[1])
    return F.pad(x, (left, right, top, bottom), value=value)


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "same" padding computed per input size (for strided convolutions)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: tuple[int, int]) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(_pad_same(x, self.kernel_size, self.stride))


class SamePool2d(nn.Module):
    """Max or average pooling with TensorFlow's "same" padding; the average excludes the padding like TF."""

    def __init__(self, kind: str, kernel_size: int, stride: tuple[int, int]) -> None:
        super().__init__()
        if kind not in ("max", "avg"):
            raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
        self.kind, self.kernel_size, self.stride = kind, (kernel_size, kernel_size), tuple(stride)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "max":
            padded = _pad_same(x, self.kernel_size, self.stride, float("-inf"))
            return F.max_pool2d(padded, self.kernel_size, self.stride)
        sums = F.avg_pool2d(_pad_same(x, self.kernel_size, self.stride), self.kernel_size, self.stride)
        ones = torch.ones_like(x[:1, :1])
        counts = F.avg_pool2d(_pad_same(ones, self.kernel_size, self.stride), self.kernel_size, self.stride)
        return sums / counts

    def extra_repr(self) -> str:
        return f"{self.kind}, kernel_size={self.kernel_size}, stride={self.stride}"


class ChannelAttention(nn.Module):
    """CBAM channel attention (Woo et al. 2018) as Hu et al. use it: a shared MLP C → C/ratio → C (ReLU,
    biases) on the global average- and max-pooled vectors, summed, sigmoid, multiplied into the maps."""

    def __init__(self, channels: int, ratio: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // ratio)
        self.fc2 = nn.Linear(channels // ratio, channels)

    def _mlp(self, v: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(v)))

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self._mlp(x.mean((2, 3))) + self._mlp(x.amax((2, 3))))
        return x * gate[:, :, None, None]


def _keras_norms(norm: NormRecorder, eps: float, momentum: float) -> Callable[..., nn.Module]:
    """``make(C, affine=True)``: ``norm(C)`` or ``norm(C, affine=False)`` with Keras's eps and momentum."""

    def make(channels: int, affine: bool = True) -> nn.Module:
        try:
            module = norm(channels) if affine else norm(channels, affine=False)
        except TypeError as exc:
            raise ValueError(
                f"this model's parameter-free norm positions call norm_layer({channels}, affine=False); "
                f"{getattr(norm.norm_layer, '__name__', norm.norm_layer)!r} does not accept it ({exc})"
            ) from exc
        for name, value in (("eps", eps), ("momentum", momentum)):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, value)
        return module

    return make


@torch.no_grad()
def _truncated_normal_(weight: Tensor, std: float) -> None:
    """N(0, std²) truncated to ±2 std by redrawing the values outside (Keras's ``truncated_normal``)."""
    weight.normal_(0.0, std)
    if weight.is_meta:
        return
    outside = weight.abs() > 2 * std
    while outside.any():
        weight[outside] = torch.randn(int(outside.sum()), dtype=weight.dtype, device=weight.device) * std
        outside = weight.abs() > 2 * std


def _keras_init(model: nn.Module, norms: list[nn.Module]) -> None:
    """Keras's ``he_normal`` (truncated normal, std sqrt(2 / fan_in)) for convolutions and dense layers,
    zero biases, and a reset of every norm."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            _truncated_normal_(module.weight, math.sqrt(2.0 / module.weight[0].numel()))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for norm in norms:
        reset_norm(norm)


class _PadChannels(nn.Module):
    """Zero channels appended up to ``out_channels`` (the reference's ``pad_depth`` + concatenate)."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))


class _PreActBlock(nn.Module):
    """[non-affine norm → ReLU → 3×3 conv] × 2 plus the identity, or, when strided (1, 2) in time, a 3×3
    average pool (stride (1, 2), same padding) with zero channels as the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, make_norm) -> None:
        super().__init__()
        stride = (1, 2) if downsample else (1, 1)
        self.norm1 = make_norm(in_channels, affine=False)
        self.conv1 = (SameConv2d(in_channels, out_channels, 3, stride) if downsample
                      else nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False))
        self.norm2 = make_norm(out_channels, affine=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (nn.Sequential(SamePool2d("avg", 3, stride), _PadChannels(out_channels)) if downsample
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + self.shortcut(x)


class _ResNetPath(nn.Module):
    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks: int, make_norm) -> None:
        super().__init__()
        self.stem = nn.Sequential(make_norm(in_channels), SameConv2d(in_channels, widths[0], 3, (1, 2)))
        channels = widths[0]
        for k, width in enumerate(widths, start=1):
            layers = [_PreActBlock(channels if b == 0 else width, width, k > 1 and b == 0, make_norm)
                      for b in range(blocks)]
            self.add_module(f"stage{k}", nn.Sequential(*layers))
            channels = width

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for k in range(1, 5):
            x = getattr(self, f"stage{k}")(x)
        return x


class AscResNet17(nn.Module):
    """McDonnell & Gao's ResNet-17: the mel axis split in two halves, each through its own pre-activation
    residual path (4 stacks × 2 blocks, widths 48/96/192/384), concatenated along frequency, then
    norm → ReLU → 1×1 conv (4 × last width) → norm → 1×1 conv to classes → norm → global average pooling.

    Input (N, 3, F, T) with even F; output logits (N, num_classes). ``forward_features`` is the pooled
    class maps (the angle metrics' features; ``feature_layer`` names the module receiving them).
    """

    feature_layer = "pooled"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        norm_layer: str | NormLayer | None = None,
        *,
        widths: tuple[int, ...] = (48, 96, 192, 384),
        blocks: int = 2,
        norm_eps: float = KERAS_EPS,
        norm_momentum: float = KERAS_MOMENTUM,
    ) -> None:
        super().__init__()
        norm = resolve_norm(norm_layer)
        make_norm = _keras_norms(norm, norm_eps, norm_momentum)
        self.paths = nn.ModuleList([_ResNetPath(in_channels, widths, blocks, make_norm) for _ in range(2)])
        hidden = 4 * widths[-1]
        self.head = nn.Sequential(
            make_norm(widths[-1], affine=False), nn.ReLU(), nn.Conv2d(widths[-1], hidden, 1, bias=False),
            make_norm(hidden, affine=False), nn.Conv2d(hidden, num_classes, 1, bias=False),
        )
        self.final_norm = make_norm(num_classes, affine=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pooled = nn.Flatten(1)
        _keras_init(self, norm.modules)

    def forward_features(self, x: Tensor) -> Tensor:
        if x.shape[2] % 2:
            raise ValueError(f"asc_resnet17 splits the mel axis in halves; got {x.shape[2]} bins (need an even number)")
        half = x.shape[2] // 2
        x = torch.cat([self.paths[0](x[:, :, :half]), self.paths[1](x[:, :, half:])], dim=2)
        return self.pool(self.final_norm(self.head(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.pooled(self.forward_features(x))


def _conv_norm_relu(cin: int, cout: int, make_norm, *, kernel: int = 3, stride=(1, 1), dropout: float = 0.0,
                    same: bool = False) -> list[nn.Module]:
    """conv (no bias) → affine norm → ReLU (→ dropout); ``same`` uses TF padding (strided convs)."""
    conv = (SameConv2d(cin, cout, kernel, stride) if same
            else nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False))
    layers = [conv, make_norm(cout), nn.ReLU()]
    return layers + [nn.Dropout(dropout)] if dropout else layers


class FCNN(nn.Module):
    """Hu et al.'s (fs)FCNN: an affine input norm, VGG-like blocks of conv → norm → ReLU, then a 1×1 conv to
    the classes → non-affine norm → ReLU → non-affine norm → channel attention → global average pooling.

    Built by :func:`fcnn` and :func:`fsfcnn` from a block list; input (N, 3, F, T), output (N, num_classes).
    """

    feature_layer = "pooled"

    def __init__(self, blocks: list[nn.Sequential], in_channels: int, width: int, num_classes: int,
                 make_norm, norm: NormRecorder, input_norm: nn.Module) -> None:
        super().__init__()
        self.input_norm = input_norm
        for k, block in enumerate(blocks, start=1):
            self.add_module(f"block{k}", block)
        self.num_blocks = len(blocks)
        self.head = nn.Sequential(nn.Conv2d(width, num_classes, 1, bias=False), make_norm(num_classes, affine=False),
                                  nn.ReLU())
        self.final_norm = make_norm(num_classes, affine=False)
        self.attention = ChannelAttention(num_classes, ratio=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pooled = nn.Flatten(1)
        _keras_init(self, norm.modules)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.input_norm(x)
        for k in range(1, self.num_blocks + 1):
            x = getattr(self, f"block{k}")(x)
        return self.pool(self.attention(self.final_norm(self.head(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.pooled(self.forward_features(x))


def fcnn(num_classes: int = 10, in_channels: int = 3, norm_layer: str | NormLayer | None = None, *,
         widths: tuple[int, int, int] = (144, 288, 576), dropout: float = 0.3,
         norm_eps: float = KERAS_EPS, norm_momentum: float = KERAS_MOMENTUM) -> FCNN:
    """FCNN (Hu et al. 2020), 11.78M parameters: [5×5 conv stride 2, 3×3 conv] max-pool 2; 2 × 3×3 conv,
    max-pool 2; 4 × 3×3 conv (dropout after the first three), max-pool 2; the attention head.

    Example: ``fcnn(norm_layer="l2bn")(torch.randn(2, 3, 128, 400)).shape == (2, 10)``.
    """
    norm = resolve_norm(norm_layer)
    make = _keras_norms(norm, norm_eps, norm_momentum)
    w1, w2, w3 = widths
    input_norm = make(in_channels)
    block1 = nn.Sequential(*_conv_norm_relu(in_channels, w1, make, kernel=5, stride=(2, 2)),
                           *_conv_norm_relu(w1, w1, make), nn.MaxPool2d(2))
    block2 = nn.Sequential(*_conv_norm_relu(w1, w2, make), *_conv_norm_relu(w2, w2, make), nn.MaxPool2d(2))
    block3 = nn.Sequential(*_conv_norm_relu(w2, w3, make, dropout=dropout),
                           *_conv_norm_relu(w3, w3, make, dropout=dropout),
                           *_conv_norm_relu(w3, w3, make, dropout=dropout),
                           *_conv_norm_relu(w3, w3, make), nn.MaxPool2d(2))
    return FCNN([block1, block2, block3], in_channels, w3, num_classes, make, norm, input_norm)


def fsfcnn(num_classes: int = 10, in_channels: int = 3, norm_layer: str | NormLayer | None = None, *,
           widths: tuple[int, int, int, int] = (48, 96, 512, 768), dropout: float = 0.5,
           norm_eps: float = KERAS_EPS, norm_momentum: float = KERAS_MOMENTUM) -> FCNN:
    """fsFCNN (Hu et al. 2020), 16.53M parameters, frequency sub-sampled only 4×: [5×5 conv stride (1, 2),
    3×3 conv] max-pool 3/2; 2 × 3×3 conv, max-pool 3/2; 2 × conv, max-pool 3/(1, 2), 2 × conv, max-pool
    3/(1, 2); 2 × [3×3 conv → norm → ReLU → dropout 0.5]; the attention head. Pools use TF "same" padding.
    """
    norm = resolve_norm(norm_layer)
    make = _keras_norms(norm, norm_eps, norm_momentum)
    w1, w2, w3, w4 = widths
    input_norm = make(in_channels)
    block1 = nn.Sequential(*_conv_norm_relu(in_channels, w1, make, kernel=5, stride=(1, 2), same=True),
                           *_conv_norm_relu(w1, w1, make), SamePool2d("max", 3, (2, 2)))
    block2 = nn.Sequential(*_conv_norm_relu(w1, w2, make), *_conv_norm_relu(w2, w2, make),
                           SamePool2d("max", 3, (2, 2)))
    block3 = nn.Sequential(*_conv_norm_relu(w2, w3, make), *_conv_norm_relu(w3, w3, make),
                           SamePool2d("max", 3, (1, 2)),
                           *_conv_norm_relu(w3, w3, make), *_conv_norm_relu(w3, w3, make),
                           SamePool2d("max", 3, (1, 2)))
    block4 = nn.Sequential(*_conv_norm_relu(w3, w4, make, dropout=dropout),
                           *_conv_norm_relu(w4, w4, make, dropout=dropout))
    return FCNN([block1, block2, block3, block4], in_channels, w4, num_classes, make, norm, input_norm)


def asc_resnet17(num_classes: int = 10, in_channels: int = 3, norm_layer: str | NormLayer | None = None,
                 **kwargs) -> AscResNet17:
    """ResNet-17 of McDonnell & Gao (2020), 12.97M parameters with 10 classes (see :class:`AscResNet17`)."""
    return AscResNet17(num_classes, in_channels, norm_layer, **kwargs)


def asc_parts(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Placement parts: ``stem`` (input norms), ``stage1``… (ResNet stacks / FCNN blocks), ``head`` (the
    norms of the class-map head but the last), ``last`` (the final parameter-free norm) and
    ``all-but-last`` (every norm but that one — what the reference's swap left)."""
    if isinstance(model, AscResNet17):
        parts = {"stem": ("paths.0.stem", "paths.1.stem")}
        parts.update({f"stage{k}": (f"paths.0.stage{k}", f"paths.1.stage{k}") for k in range(1, 5)})
    elif isinstance(model, FCNN):
        parts = {"stem": ("input_norm",)}
        parts.update({f"stage{k}": (f"block{k}",) for k in range(1, model.num_blocks + 1)})
    else:
        raise TypeError(f"asc_parts expects AscResNet17 or FCNN, got {type(model).__name__}")
    parts["head"] = ("head",)
    parts["last"] = ("final_norm",)
    parts["all-but-last"] = tuple(p for v in parts.values() for p in v if p != "final_norm")
    return parts
