"""The per-model check the timm and torchvision sweeps share (a helper, no tests).

:func:`check_model` converts a model and then checks: no BatchNorm-like layer left (or the conversion's warning
names each one left), the default (fast) implementation equal to the reference composition (``L2BN_IMPL=
reference``) in a training forward + backward and an eval forward, and one SGD step giving finite parameters
and a finite eval output.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import l2bn
from l2bn.convert import unconverted_batchnorms
from l2bn.kernels.dispatch import IMPL_ENV_VAR

# Fast path against reference, both in float64 (in float32, training-mode BatchNorm with a batch of 2 through
# a hundred layers amplifies rounding to ~1e-2 on either path): max|fast - reference| <= TOL * max|reference|,
# per output tensor; for gradients, the max over all of them (a conv bias before a norm has a gradient that is
# 0 up to rounding)
TOL = 1e-6
# A model so ill-conditioned that float64 rounding alone exceeds TOL (efficientvim_m2: gradients of 4e4 from a
# loss of 0.04; batch-2 statistics over 2x2 maps) is held to FLOOR_FACTOR times the distance of the torch-op
# ``fused`` path from the reference, per tensor: no further from the reference than another float64 path is.
FLOOR_FACTOR = 4.0
MAX_PARAMS = 50_000_000


def tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, list, dict, nested), in order."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        return [t for key in output for t in tensors(output[key])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in tensors(item)]
    return []


def skip_unless_swept(build: Callable[[], nn.Module], max_params: int = MAX_PARAMS) -> None:
    """Skip (with the reason) a model that has no BatchNorm-family layer or more than ``max_params``
    parameters; decided on the meta device where the builder allows it, so nothing is allocated."""
    try:
        with torch.device("meta"):
            model = build()
    except NotImplementedError:  # builders that read values while initialising (torchvision's RegNets)
        model = build()
    if not unconverted_batchnorms(model):
        pytest.skip("no BatchNorm-family layer")
    count = sum(p.numel() for p in model.parameters())
    if count > max_params:
        pytest.skip(f"{count / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M")


def _errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    """max |got − want| per tensor pair (0 for empty tensors)."""
    return [(g - w).abs().max().item() if w.numel() else 0.0 for g, w in zip(got, want)]


def _excess(got: list[torch.Tensor], want: list[torch.Tensor], what: str, scale: float | None = None,
            floor: list[float] | None = None) -> list[str]:
    """The tensors of ``got`` further from ``want`` than TOL relative to ``want``'s largest value (or ``scale``)
    and than ``floor`` (per tensor, when given), each as a message; shapes and counts must match."""
    assert len(got) == len(want), f"{what}: {len(got)} tensors, reference {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)}, reference {tuple(w.shape)}"
        assert torch.isfinite(w).all(), f"{what}[{i}]: the reference is not finite"
    out = []
    for i, (w, error) in enumerate(zip(want, _errors(got, want))):
        if w.numel():
            bound = TOL * (w.abs().max().item() if scale is None else scale) + 1e-12
            if floor is not None:
                bound = max(bound, FLOOR_FACTOR * floor[i])
            if error > bound:
                out.append(f"{what}[{i}]: max error {error:.3g} > {bound:.3g}")
    return out


def _train_pass(model: nn.Module, forward: Callable, loss_of: Callable) -> tuple[list, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout / sampling draws on both paths
    output = forward(model)
    loss_of(output).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for t in tensors(output)], grads


def _eval_pass(model: nn.Module, forward: Callable) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return tensors(forward(model))


def _float64_passes(model: nn.Module, f64: Callable, loss_of: Callable, monkeypatch: pytest.MonkeyPatch,
                    impl: str | None) -> tuple[list, dict[str, torch.Tensor], list]:
    """(training output, gradients, eval output) of a float64 copy of ``model`` on ``impl`` (None: the default)."""
    with monkeypatch.context() as patch:
        if impl is None:
            patch.delenv(IMPL_ENV_VAR, raising=False)
        else:
            patch.setenv(IMPL_ENV_VAR, impl)
        copied = copy.deepcopy(model).double()
        out, grads = _train_pass(copied, f64, loss_of)
        return out, grads, _eval_pass(copied, f64)


def _comparisons(got: tuple, want: tuple) -> list[tuple[list, list, str, float | None]]:
    """(got, want, what, scale) for the training output, the gradients (relative to the largest) and the eval
    output of two :func:`_float64_passes`."""
    largest = max(g.abs().max().item() for g in want[1].values())
    return [(got[0], want[0], "training output", None),
            (list(got[1].values()), list(want[1].values()), "gradient", largest),
            (got[2], want[2], "eval output", None)]


def check_model(model: nn.Module, forward: Callable[[nn.Module, torch.dtype], Any],
                loss_of: Callable[[Any], torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    """Convert ``model`` to L2BN and run the sweep's checks; ``forward(model, dtype)`` runs it on fixed inputs
    of that dtype (in training mode it returns what ``loss_of`` turns into the scalar loss)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = l2bn.convert_to_l2bn(model)
    warned = " ".join(str(w.message) for w in caught)
    left = unconverted_batchnorms(model)
    assert all(name in warned for name in left), f"left without a warning: {left}"
    assert any(isinstance(m, (l2bn.layers._L2BatchNorm, l2bn.FrozenL2BatchNorm2d)) for m in model.modules())

    f64 = lambda m: forward(m, torch.float64)  # noqa: E731
    fast = _float64_passes(model, f64, loss_of, monkeypatch, None)
    reference = _float64_passes(model, f64, loss_of, monkeypatch, "reference")
    assert fast[1].keys() == reference[1].keys() and fast[1], "gradients reach other parameters than the reference's"
    comparisons = _comparisons(fast, reference)
    excess = [m for got, want, what, scale in comparisons for m in _excess(got, want, what, scale)]
    if excess:  # ill-conditioned in float64 too? Then no closer than another float64 path can be
        fused = _comparisons(_float64_passes(model, f64, loss_of, monkeypatch, "fused"), reference)
        excess = [m for (got, want, what, scale), (other, *_rest) in zip(comparisons, fused)
                  for m in _excess(got, want, what, scale, floor=_errors(other, want))]
    assert not excess, "; ".join(excess)

    f32 = lambda m: forward(m, torch.float32)  # noqa: E731
    _train_pass(model, f32, loss_of)
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    after = list(model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after)), "the SGD step changed nothing"
    assert all(torch.isfinite(a).all() for a in after)
    assert all(torch.isfinite(t).all() for t in _eval_pass(model, f32)), "eval output after the step"


def check_image_model(model: nn.Module, side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`check_model` on a fixed batch of two random ``side``×``side`` RGB images, with the mean square of
    every output tensor as the training loss."""
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    check_model(model, lambda m, dtype: m(x.to(dtype)), lambda out: sum(t.square().mean() for t in tensors(out)),
                monkeypatch)
