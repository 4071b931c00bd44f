"""L2BN modules: BatchNorm's constructor, parameters, buffers and state_dict keys, with the l2 step first;
and the frozen variant, torchvision's ``FrozenBatchNorm2d`` with the l2 step first."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import check_l2_eps, l2_batch_norm

__all__ = ["FrozenL2BatchNorm2d", "L2BatchNorm1d", "L2BatchNorm2d", "L2BatchNorm3d"]

STATE_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")  # a layer call's tensors
_FROZEN_STATE = STATE_NAMES[:4]  # FrozenL2BatchNorm2d: all four are buffers


def batch_average_factor(num_batches_tracked: Tensor | None, momentum: float | None, counting: bool) -> float:
    """BatchNorm's running-statistics factor: ``momentum``, or 1/batches counted when it is None; ``counting``
    adds this batch to ``num_batches_tracked`` first (a function, so fx tracing records it rather than runs it)."""
    if counting and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else momentum


def own_tensors(module: nn.Module, names: tuple[str, ...]) -> list[Tensor | None]:
    """``module.<name>`` for each name, read from the module's parameter and buffer tables where it is there:
    ``nn.Module.__getattr__`` costs ~0.6 µs a name here, and a layer call reads four (eval) or five (training),
    about as much as the kernel at (128, 64). A name not in the tables (a parametrization's property, say) is read
    as an attribute."""
    parameters, buffers = module._parameters, module._buffers
    return [parameters[n] if n in parameters else buffers[n] if n in buffers else getattr(module, n) for n in names]


class _L2BatchNorm(_BatchNorm):
    """Shared implementation; subclasses only check the input rank.

    Subclassing ``_BatchNorm`` keeps every attribute, buffer and state_dict key of torch's BatchNorm, so
    checkpoints load both ways. It also means tools that handle "any BatchNorm" treat these layers as plain
    BatchNorm — ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns them into SyncBatchNorm (use
    :func:`l2bn.convert_sync_l2bn`) and ``torch.nn.utils.fusion.fuse_conv_bn_eval`` folds them into a wrong
    convolution (the per-sample norm depends on the input: L2BN cannot be folded).
    """

    _expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        rescale: bool = True,
        l2_eps: float = 1e-12,
    ) -> None:
        extra = {} if bias else {"bias": False}  # torch's own keyword; older torch raises for it, as it should
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **extra)
        self.rescale = rescale
        self.l2_eps = check_l2_eps(l2_eps)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._expected_dims:
            wanted = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"expected {wanted} input (got {input.dim()}D input)")

    def _average_factor(self, input: Tensor, counter: Tensor | None) -> float:
        """Momentum of this step's running-statistics update; counts the batch (``counter``, the module's
        ``num_batches_tracked``) when training."""
        if isinstance(input, torch.fx.Proxy) and counter is not None:  # record the count, do not run it
            counter = torch.fx.Proxy(input.tracer.create_arg(counter), input.tracer)
        return batch_average_factor(counter, self.momentum, self.training and self.track_running_stats)

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, torch.fx.Proxy):  # fx symbolic tracing: checked when the graph runs
            self._check_input_dim(input)
        training = self.training
        weight, bias, running_mean, running_var, counter = own_tensors(self, STATE_NAMES)
        factor = self._average_factor(input, counter) if training else 0.0  # unused in evaluation mode
        keep_running = not training or self.track_running_stats
        return l2_batch_norm(
            input,
            running_mean if keep_running else None,
            running_var if keep_running else None,
            weight,
            bias,
            training or running_mean is None,
            factor,
            self.eps,
            rescale=self.rescale,
            l2_eps=self.l2_eps,
        )

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(
            f"{type(self).__name__} does not support torch.jit.script (its forward picks a kernel in Python); "
            "use torch.jit.trace or torch.export.export, which record the plain-aten reference composition"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rescale={self.rescale}, l2_eps={self.l2_eps}"


class L2BatchNorm1d(_L2BatchNorm):
    """L2BN over (N, C) or (N, C, L) input: :class:`torch.nn.BatchNorm1d` after scaling each sample to norm sqrt(D).

    Same arguments as BatchNorm1d (``num_features``, ``eps``, ``momentum``, ``affine``,
    ``track_running_stats``, ``device``, ``dtype``, ``bias=``), plus ``rescale`` (multiply the unit-norm
    sample by sqrt(D), D = C·L; the paper's eq. 3) and ``l2_eps`` (lower bound on a sample's norm).

    Shape:
        input (N, C) or (N, C, L); output the same shape.

    Example::

        >>> layer = L2BatchNorm1d(16)
        >>> layer(torch.randn(8, 16, 20)).shape
        torch.Size([8, 16, 20])
    """

    _expected_dims = (2, 3)


class L2BatchNorm2d(_L2BatchNorm):
    """L2BN over (N, C, H, W) input: :class:`torch.nn.BatchNorm2d` after scaling each sample to norm sqrt(D).

    Same arguments, parameters, buffers and state_dict keys as BatchNorm2d, plus ``rescale`` (multiply the
    unit-norm sample by sqrt(D), D = C·H·W) and ``l2_eps`` (lower bound on a sample's norm).

    Shape:
        input (N, C, H, W); output the same shape.

    Example::

        >>> layer = L2BatchNorm2d(3)
        >>> x = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(4, 1, 1, 1)
        >>> y = layer(x)  # the four samples' scales no longer matter
        >>> torch.allclose(y, layer(x / x.flatten(1).norm(dim=1).view(4, 1, 1, 1)), atol=1e-4)
        True
        >>> layer.load_state_dict(torch.nn.BatchNorm2d(3).state_dict())  # BatchNorm checkpoints load
        <All keys matched successfully>
    """

    _expected_dims = (4,)


class L2BatchNorm3d(_L2BatchNorm):
    """L2BN over (N, C, D, H, W) input: :class:`torch.nn.BatchNorm3d` after scaling each sample to norm sqrt(D).

    Same arguments as BatchNorm3d, plus ``rescale`` and ``l2_eps`` (see :class:`L2BatchNorm2d`).

    Shape:
        input (N, C, D, H, W); output the same shape.

    Example::

        >>> L2BatchNorm3d(4)(torch.randn(2, 4, 3, 5, 5)).shape
        torch.Size([2, 4, 3, 5, 5])
    """

    _expected_dims = (5,)


class FrozenL2BatchNorm2d(nn.Module):
    """L2BN with fixed statistics and affine over (N, C, H, W): what ``torchvision.ops.FrozenBatchNorm2d`` is to BN.

    Each sample is still scaled to norm sqrt(D), D = C·H·W (that step depends on the input alone); then the
    stored ``running_mean``, ``running_var``, ``weight`` and ``bias`` buffers apply, in train and eval mode
    alike. Same buffers, ``eps`` and state_dict keys as torchvision's ``FrozenBatchNorm2d`` (a BatchNorm
    checkpoint's ``num_batches_tracked`` is dropped on load), plus ``rescale`` and ``l2_eps``.

    Shape:
        input (N, C, H, W); output the same shape.

    Example::

        >>> layer = FrozenL2BatchNorm2d(8)
        >>> layer(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
        >>> sorted(layer.state_dict())
        ['bias', 'running_mean', 'running_var', 'weight']
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rescale: bool = True,
        l2_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.rescale = rescale
        self.l2_eps = check_l2_eps(l2_eps)
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_frozen(cls, frozen: nn.Module, **kwargs) -> "FrozenL2BatchNorm2d":
        """A ``cls`` with ``frozen``'s buffers, eps, device, dtype and mode (``kwargs``: ``rescale``, ``l2_eps``, …)."""
        weight = frozen.weight
        new = cls(weight.numel(), frozen.eps, device=weight.device, dtype=weight.dtype, **kwargs)
        new.load_state_dict(frozen.state_dict())
        return new.train(frozen.training)

    def to_frozen(self, frozen_cls: type[nn.Module], **kwargs) -> nn.Module:
        """The ``frozen_cls`` (e.g. torchvision's ``FrozenBatchNorm2d``) with this layer's buffers, eps and mode."""
        old = frozen_cls(self.num_features, self.eps, **kwargs).to(self.weight.device, self.weight.dtype)
        old.load_state_dict(self.state_dict())
        return old.train(self.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm checkpoints load, as into FrozenBatchNorm2d
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, torch.fx.Proxy) and input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        weight, bias, running_mean, running_var = own_tensors(self, _FROZEN_STATE)
        return l2_batch_norm(
            input, running_mean, running_var, weight, bias, False, 0.0, self.eps, rescale=self.rescale,
            l2_eps=self.l2_eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, rescale={self.rescale}, l2_eps={self.l2_eps}"


# fx symbolic tracing (feature extractors, fx passes) records these calls as graph nodes; the layer's mode is
# fixed at trace time, as for every module fx traces through
torch.fx.wrap("l2_batch_norm")
torch.fx.wrap("batch_average_factor")
