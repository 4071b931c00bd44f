"""UBN against a float64 re-derivation written here from the rule (docs/norms.md), step by step and in eval."""
from __future__ import annotations

import copy
import itertools
import math
import os
import subprocess
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from l2bn.norms import (
    UnifiedBatchNorm1d,
    UnifiedBatchNorm2d,
    UnifiedBatchNorm3d,
    condensation_summary,
    create_norm,
    feature_condensation,
    get_norm_layer,
)

D = torch.float64
EPS = 1e-5


pytestmark = pytest.mark.usefixtures("seeded")


# ---------------------------------------------------------------- the re-derivation


def pairwise_condensation(x: torch.Tensor, cap: int = 16) -> float:
    """Mean cosine similarity over ordered pairs of distinct samples among the first ``cap``, one pair at a time."""
    rows = [row.detach().reshape(-1).to(D) for row in x[:cap]]
    if len(rows) == 1:
        return 1.0
    pairs = list(itertools.permutations(range(len(rows)), 2))
    total = 0.0
    for i, j in pairs:
        a, b = rows[i], rows[j]
        total += float(a @ b) / (max(float(a.norm()), 1e-8) * max(float(b.norm()), 1e-8))
    return total / len(pairs)


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Σ over kernel offsets of weight[c, offset] · x shifted by that offset, zero padding k // 2, plus bias."""
    kernel = weight.shape[2:]
    positions = x.shape[2:]
    padded = F.pad(x, [p for k in reversed(kernel) for p in (k // 2, k // 2)])
    shape = (1, -1) + (1,) * len(positions)
    out = bias.view(shape).expand_as(x)
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = padded[(slice(None), slice(None)) + tuple(slice(o, o + p) for o, p in zip(offset, positions))]
        out = out + weight[(slice(None), 0) + offset].view(shape) * window
    return out


class RederivedUBN:
    """The rule in plain float64 steps with python-side state (m, running mean/var, count) and its own parameters."""

    def __init__(self, module: nn.Module) -> None:
        self.config = {k: getattr(module, k) for k in (
            "eps", "momentum", "track_running_stats", "condensation_threshold", "condensation_momentum",
            "condensation_samples")}
        self.params = {k: v.detach().clone().to(D).requires_grad_(True) for k, v in module.named_parameters()}
        self.m = 1.0
        self.mean = torch.zeros(module.num_features, dtype=D)
        self.var = torch.ones(module.num_features, dtype=D)
        self.count = 0
        self.gate_history: list[bool] = []

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        cfg, p = self.config, self.params
        vector = x.dim() == 2
        if vector:
            x = x.unsqueeze(-1)
        pos = tuple(range(2, x.dim()))
        shape = (1, -1) + (1,) * len(pos)
        per_position = math.prod(x.shape[2:])
        if training:
            c = pairwise_condensation(x, cfg["condensation_samples"])
            a = cfg["condensation_momentum"]
            self.m = (1 - a) * self.m + a * c
        xc = x + p["center_weight"].view(shape) * (x.sum(pos, keepdim=True) / per_position)
        rows = xc.transpose(0, 1).reshape(x.shape[1], -1)
        n = rows.shape[1]
        batch_mean = rows.sum(1) / n
        batch_var = ((rows - batch_mean[:, None]) ** 2).sum(1) / n
        if not cfg["track_running_stats"]:
            mean, var = batch_mean, batch_var
        elif not training:
            mean, var = self.mean, self.var
        else:
            self.count += 1
            open_gate = self.m > cfg["condensation_threshold"]
            self.gate_history.append(open_gate)
            if open_gate:
                f = 1 / self.count if cfg["momentum"] is None else cfg["momentum"]
                mean, var = batch_mean, batch_var
                self.mean = (1 - f) * self.mean + f * batch_mean.detach()
                self.var = (1 - f) * self.var + f * batch_var.detach() * n / (n - 1)
            else:
                mean, var = self.mean, self.var
        xh = (xc - mean.view(shape)) / torch.sqrt(var.view(shape) + cfg["eps"])
        pooled = xh.sum(pos, keepdim=True) / per_position
        scale = 1 / (1 + torch.exp(-(p["scale_weight"].view(shape) * pooled + p["scale_bias"].view(shape))))
        if "affine_conv.weight" in p:
            xh = depthwise_conv(xh, p["affine_conv.weight"], p["affine_conv.bias"])
        y = scale * xh
        return y.squeeze(-1) if vector else y


def randomized(cls, c: int, **kwargs) -> nn.Module:
    m = cls(c, dtype=D, **kwargs)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if name.startswith(("center", "affine")) else 1.0))
    return m


def diverse(shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=D) * 1.3


def condensed(shape) -> torch.Tensor:
    """Near-copies of one sample: condensation close to 1."""
    one = torch.randn(1, *shape[1:], dtype=D) + 0.5
    return one.expand(*shape) + 0.01 * torch.randn(*shape, dtype=D)


def assert_matches(module: nn.Module, ref: RederivedUBN) -> None:
    assert float(module.running_condensation) == pytest.approx(ref.m, abs=1e-12)
    if module.track_running_stats:
        torch.testing.assert_close(module.running_mean, ref.mean)
        torch.testing.assert_close(module.running_var, ref.var)
        assert int(module.num_batches_tracked) == ref.count


CASES = {
    "2d": (UnifiedBatchNorm2d, (6, 3, 5, 4), {}),
    "2d-cumulative": (UnifiedBatchNorm2d, (6, 3, 4, 4), {"momentum": None}),
    "2d-no-affine": (UnifiedBatchNorm2d, (5, 3, 4, 4), {"affine": False}),
    "2d-k5": (UnifiedBatchNorm2d, (4, 2, 6, 5), {"kernel_size": 5}),
    "2d-no-running": (UnifiedBatchNorm2d, (6, 3, 4, 4), {"track_running_stats": False}),
    "1d": (UnifiedBatchNorm1d, (6, 3, 7), {}),
    "1d-vectors": (UnifiedBatchNorm1d, (8, 4), {}),
    "3d": (UnifiedBatchNorm3d, (4, 2, 3, 4, 3), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_sequence_across_the_bound_then_eval(case):
    """26 steps: diverse batches pull m below 0.15 (frozen), condensed ones push it back (open), then eval."""
    cls, shape, kwargs = CASES[case]
    module = randomized(cls, shape[1], **kwargs)
    ref = RederivedUBN(module)
    batches = [diverse(shape) for _ in range(20)] + [condensed(shape) for _ in range(2)]
    batches += [diverse(shape) for _ in range(4)]
    for x in batches:
        x_mod, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        module.zero_grad()
        y = module(x_mod)
        y_ref = ref(x_ref, training=True)
        torch.testing.assert_close(y, y_ref)
        weights = torch.randn_like(y)
        (y * weights).sum().backward()
        (y_ref * weights).sum().backward()
        torch.testing.assert_close(x_mod.grad, x_ref.grad)
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.grad, ref.params[name].grad, msg=f"{case}: gradient of {name}")
            ref.params[name].grad = None
        assert_matches(module, ref)
    if module.track_running_stats:
        gates = ref.gate_history
        assert True in gates and False in gates, gates
        assert any(a and not b for a, b in zip(gates, gates[1:])), "never froze"
        assert any(b and not a for a, b in zip(gates, gates[1:])), "never reopened"
    module.eval()
    before = copy.deepcopy(module.state_dict())
    x = diverse(shape)
    torch.testing.assert_close(module(x), ref(x, training=False))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), f"eval changed {key}"


def test_condensation_matches_pairwise_loop():
    for shape in [(2, 3, 4, 4), (7, 5, 3, 2), (6, 9), (5, 4, 6)]:
        x = torch.randn(*shape, dtype=D) + 0.3
        assert float(feature_condensation(x)) == pytest.approx(pairwise_condensation(x), abs=1e-12)
    assert float(feature_condensation(torch.randn(1, 3, 2, 2))) == 1.0
    x = torch.randn(5, 3, 2, 2, dtype=D)
    x[2] = 0  # a zero sample is orthogonal to every other one
    assert float(feature_condensation(x)) == pytest.approx(pairwise_condensation(x), abs=1e-12)
    half = feature_condensation(torch.randn(6, 4, 3, 3).half())
    assert half.dtype == torch.float32


def test_condensation_uses_the_first_16_samples():
    x = torch.randn(20, 3, 4, 4, dtype=D)
    x[16:] = x[0] * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D).view(4, 1, 1, 1)  # parallel to sample 0
    first, every = pairwise_condensation(x), pairwise_condensation(x, cap=20)
    assert every - first > 0.01
    assert float(feature_condensation(x)) == pytest.approx(first, abs=1e-12)
    assert float(feature_condensation(x, max_samples=20)) == pytest.approx(every, abs=1e-12)
    # the layer's cap decides its gate: threshold between the two values, moving value = this batch's value
    threshold = (first + every) / 2
    for cap, gated in ((16, first <= threshold), (20, every <= threshold)):
        cap_kwargs = {} if cap == 16 else {"condensation_samples": cap}  # 16: the default
        m = UnifiedBatchNorm2d(3, dtype=D, condensation_momentum=1.0, condensation_threshold=threshold, **cap_kwargs)
        m(x)
        assert float(m.running_condensation) == pytest.approx(first if cap == 16 else every, abs=1e-12)
        assert bool(m.gated) is gated


@pytest.mark.parametrize("threshold, frozen", [(1.0, True), (math.nextafter(1.0, 0.0), False)])
def test_bound_is_strict(threshold, frozen):
    """m stays exactly 1 (condensation momentum 0): m ≤ τ = 1 freezes, τ just below 1 does not."""
    m = randomized(UnifiedBatchNorm2d, 3, condensation_threshold=threshold, condensation_momentum=0.0)
    x = diverse((6, 3, 4, 4))
    m(x)
    assert float(m.running_condensation) == 1.0 and bool(m.gated) is frozen
    assert torch.equal(m.running_mean, torch.zeros(3, dtype=D)) is frozen
    assert int(m.num_batches_tracked) == 1


def test_frozen_training_step_is_the_eval_function():
    """Gated: normalisation with the running statistics (gradient as in eval), statistics untouched."""
    m = randomized(UnifiedBatchNorm2d, 4)
    for _ in range(3):
        m(diverse((6, 4, 3, 3)) + 1)  # running statistics away from their init
    m.condensation_threshold = 1.0  # m < 1 now: frozen
    stats = m.running_mean.clone(), m.running_var.clone()
    x = diverse((6, 4, 3, 3)).requires_grad_(True)
    frozen = copy.deepcopy(m).eval()
    y = m(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    y_eval = frozen(x)
    (grad_eval,) = torch.autograd.grad(y_eval.square().sum(), x)
    torch.testing.assert_close(y, y_eval)
    torch.testing.assert_close(grad, grad_eval)
    assert torch.equal(m.running_mean, stats[0]) and torch.equal(m.running_var, stats[1])
    assert int(m.num_batches_tracked) == 4


def test_eval_is_per_sample_and_stateless():
    m = randomized(UnifiedBatchNorm2d, 3)
    m(diverse((6, 3, 4, 4)))
    m.eval()
    state = copy.deepcopy(m.state_dict())
    x = diverse((5, 3, 4, 4))
    together = m(x)
    alone = torch.cat([m(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("threshold", [0.15, 1.0])  # open (m = 1 > 0.15) and frozen (m = 1 ≤ 1)
def test_gradients_match_finite_differences(threshold):
    m = randomized(UnifiedBatchNorm2d, 3, condensation_threshold=threshold, condensation_momentum=0.0)
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(3, dtype=D))
        m.running_var.copy_(torch.rand(3, dtype=D) + 0.5)
    x = diverse((3, 3, 3, 3)).requires_grad_(True)
    params = tuple(m.parameters())
    assert torch.autograd.gradcheck(lambda inp, *ps: m(inp), (x, *params), eps=1e-6, atol=1e-5)


def test_state_dict_round_trip_keeps_the_moving_value():
    m = randomized(UnifiedBatchNorm2d, 3)
    for _ in range(20):
        m(diverse((6, 3, 4, 4)))
    assert bool(m.gated)
    assert set(m.state_dict()) == {
        "center_weight", "scale_weight", "scale_bias", "affine_conv.weight", "affine_conv.bias",
        "running_mean", "running_var", "num_batches_tracked", "running_condensation"}
    assert m.running_condensation.shape == (1,)
    fresh = UnifiedBatchNorm2d(3, dtype=D)
    fresh.load_state_dict(m.state_dict())
    assert bool(fresh.gated)
    x = diverse((6, 3, 4, 4))
    torch.testing.assert_close(fresh(x), m(x))
    for key, value in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_reset_parameters_restores_the_init():
    torch.manual_seed(3)
    m = UnifiedBatchNorm2d(4, dtype=D)
    init = copy.deepcopy(m.state_dict())
    assert torch.equal(init["center_weight"], torch.zeros(4, dtype=D))
    assert torch.equal(init["scale_bias"], torch.ones(4, dtype=D))
    assert float(init["running_condensation"]) == 1.0
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    m(diverse((5, 4, 3, 3)))
    torch.manual_seed(3)  # the convolution's init is torch's default (random): same draw, same values
    m.reset_parameters()
    for key, value in m.state_dict().items():
        assert torch.equal(value, init[key]), key


def test_host_is_never_read_in_a_training_step(monkeypatch):
    """The gate is a device-side select: no .item() / bool() of a tensor in forward."""
    m = UnifiedBatchNorm2d(3)
    m.condensation_threshold = 1.0  # frozen and open paths both run the same ops
    x = torch.randn(4, 3, 5, 5)

    def host_read(*args, **kwargs):
        raise AssertionError("host read in forward")

    for name in ("item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    m(x)
    m.condensation_threshold = 0.15
    m(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_synchronisation_on_cuda():
    m = UnifiedBatchNorm2d(8, device="cuda")
    x = torch.randn(32, 8, 6, 6, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(25):  # crosses the bound
            m(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(m.gated)


@pytest.mark.slow
def test_compiles_as_one_graph_across_the_bound():
    m = randomized(UnifiedBatchNorm2d, 3).float()
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True)
    for _ in range(25):
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(compiled(x), eager(x))
    assert bool(m.gated) and bool(eager.gated)
    torch.testing.assert_close(m.running_mean, eager.running_mean)
    torch.testing.assert_close(m.running_condensation, eager.running_condensation)


def test_single_value_per_channel():
    """Batch statistics need two values per channel (error when open); frozen, the running statistics serve."""
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        UnifiedBatchNorm1d(3)(torch.randn(1, 3))
    m = UnifiedBatchNorm1d(3, condensation_threshold=1.0, condensation_momentum=0.0)
    x = torch.randn(1, 3)
    torch.testing.assert_close(m(x), copy.deepcopy(m).eval()(x))
    with pytest.raises(ValueError, match="at least one sample"):
        UnifiedBatchNorm2d(3)(torch.randn(0, 3, 2, 2))


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match=r"condensation_threshold .*\[-1, 1\], got 1.5"):
        UnifiedBatchNorm2d(3, condensation_threshold=1.5)
    with pytest.raises(ValueError, match="condensation_momentum must be in"):
        UnifiedBatchNorm2d(3, condensation_momentum=-0.1)
    with pytest.raises(ValueError, match="condensation_samples must be a positive int, got 0"):
        UnifiedBatchNorm2d(3, condensation_samples=0)
    with pytest.raises(ValueError, match="kernel_size must be odd .* got 4"):
        UnifiedBatchNorm2d(3, kernel_size=4)
    with pytest.raises(ValueError, match=r"expects 4D input .* got 3D"):
        UnifiedBatchNorm2d(3)(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match=r"expects 2D \(N, C\) or 3D"):
        UnifiedBatchNorm1d(3)(torch.randn(4, 3, 5, 5))
    with pytest.raises(ValueError, match="expects 5D input"):
        UnifiedBatchNorm3d(3)(torch.randn(4, 3, 5, 5))
    with pytest.raises(ValueError, match=r"UnifiedBatchNorm2d\(3\) got input with 4 channels"):
        UnifiedBatchNorm2d(3)(torch.randn(4, 4, 5, 5))


def test_registry_and_conventions():
    m = create_norm("UBN", 8, condensation_threshold=0.3, kernel_size=5)
    assert type(m) is UnifiedBatchNorm2d and m.condensation_threshold == 0.3
    assert m.affine_conv.kernel_size == (5, 5) and m.affine_conv.padding == (2, 2) and m.affine_conv.groups == 8
    assert type(UnifiedBatchNorm1d(4).affine_conv) is nn.Conv1d and type(UnifiedBatchNorm3d(4).affine_conv) is nn.Conv3d
    assert UnifiedBatchNorm2d(4, affine=False).affine_conv is None
    no_stats = UnifiedBatchNorm2d(4, track_running_stats=False)
    assert no_stats.running_mean is None and no_stats.running_condensation.shape == (1,)
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(m(x), m(x.contiguous(memory_format=torch.channels_last)))


def test_torchvision_resnet18_trains_a_step():
    model = torchvision.models.resnet18(num_classes=4, norm_layer=get_norm_layer("ubn"))
    ubn = [m for m in model.modules() if isinstance(m, UnifiedBatchNorm2d)]
    assert len(ubn) == 20
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.fc.weight.detach().clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.fc.weight)
    for m in ubn:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        assert int(m.num_batches_tracked) == 1 and float(m.running_condensation) < 1.0
    summary = condensation_summary(model)
    assert set(summary) == {"ubn_condensation", "ubn_gated"} and summary["ubn_gated"] == 0.0
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()
    assert condensation_summary(model) == summary


def test_condensation_summary():
    layers = [UnifiedBatchNorm2d(2), UnifiedBatchNorm1d(2, condensation_threshold=0.5), UnifiedBatchNorm2d(2)]
    for layer, value in zip(layers, (0.9, 0.5, 0.1)):
        layer.running_condensation.fill_(value)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), layers[0], nn.Sequential(layers[1], layers[2]))
    summary = condensation_summary(model)
    assert summary["ubn_condensation"] == pytest.approx(0.5)
    assert summary["ubn_gated"] == pytest.approx(2 / 3)  # 0.5 ≤ 0.5 (strict bound), 0.1 ≤ 0.15
    assert condensation_summary(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))) == {}


# ---------------------------------------------------------------- the public code itself, where it is at hand

REFERENCE_GIT = Path(os.environ.get("L2BN_UBN_REFERENCE_GIT", "/work/.mirror/aHapBean+UBN_mmdectection/repo"))


def load_reference() -> types.ModuleType:
    """``mmdet/models/utils/UBN.py`` of aHapBean/UBN_mmdectection, read from a local git directory if present."""
    if not REFERENCE_GIT.is_dir():
        pytest.skip(f"no clone of aHapBean/UBN_mmdectection at {REFERENCE_GIT} (set L2BN_UBN_REFERENCE_GIT)")
    shown = subprocess.run(["git", f"--git-dir={REFERENCE_GIT}", "show", "HEAD:mmdet/models/utils/UBN.py"],
                           capture_output=True, text=True)
    if shown.returncode:
        pytest.skip(f"mmdet/models/utils/UBN.py not readable in {REFERENCE_GIT}: {shown.stderr.strip()}")
    module = types.ModuleType("ubn_reference")
    exec(compile(shown.stdout, "UBN.py", "exec"), module.__dict__)
    return module


def test_matches_the_public_reference_layer():
    reference = load_reference()
    ours = randomized(UnifiedBatchNorm2d, 3)
    theirs = reference.UnifiedBatchNorm2d(3).to(D)
    with torch.no_grad():
        for name in ("center_weight", "scale_weight", "scale_bias"):
            getattr(theirs, name).copy_(getattr(ours, name).view(1, 3, 1, 1))
        theirs.bnconv.weight.copy_(ours.affine_conv.weight)
        theirs.bnconv.bias.copy_(ours.affine_conv.bias)
    shape = (6, 3, 5, 4)
    for x in [diverse(shape) for _ in range(20)] + [condensed(shape)] + [diverse(shape) for _ in range(3)]:
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ours.zero_grad(), theirs.zero_grad()
        y_ours, y_theirs = ours(a), theirs(b)
        torch.testing.assert_close(y_ours, y_theirs)
        y_ours.square().sum().backward()
        y_theirs.square().sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(ours.affine_conv.weight.grad, theirs.bnconv.weight.grad)
        torch.testing.assert_close(ours.center_weight.grad, theirs.center_weight.grad.flatten())
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert float(ours.running_condensation) == pytest.approx(float(theirs.moving_cos), abs=1e-6)  # theirs: float32
    ours.eval(), theirs.eval()
    x = diverse(shape)
    moving = float(theirs.moving_cos)
    torch.testing.assert_close(ours(x), theirs(x))
    assert float(theirs.moving_cos) != moving  # the reference measures in eval too; ours does not
