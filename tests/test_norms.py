"""Numerics of every zoo layer against independent float64 formulas written here (train and eval)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from l2bn.norms import (
    BatchChannelNorm,
    BatchInstanceNorm,
    GroupNormCPG,
    INBatchNorm,
    InstanceNormNd,
    LayerNormNd,
    LNBatchNorm,
    PNBatchNorm,
    PositionalNorm,
    SwitchableNorm,
    bcn_num_groups,
)

D = torch.float64
EPS = 1e-5


pytestmark = pytest.mark.usefixtures("seeded")


def randomize_(module: nn.Module) -> nn.Module:
    """Give every parameter non-trivial values so that affine and mixing terms are exercised."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand_like(p) * 1.5 + 0.25)
    return module


def sample(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=D) * 2.0 + 0.7


def per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def batch_stats(x: torch.Tensor):
    """Per-channel mean and biased variance over batch and positions, from plain sums."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1)
    m = flat.shape[1]
    s1, s2 = flat.sum(1), (flat * flat).sum(1)
    mean = s1 / m
    return mean, s2 / m - mean * mean, m


def standardize_groups(x: torch.Tensor, groups: int, eps: float = EPS) -> torch.Tensor:
    """Per-sample, per-group standardisation with the biased variance."""
    n = x.shape[0]
    g = x.reshape(n, groups, -1)
    mean = g.sum(-1, keepdim=True) / g.shape[-1]
    var = ((g - mean) ** 2).sum(-1, keepdim=True) / g.shape[-1]
    return ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)


def bn_formula(x, mean, var, weight=None, bias=None, eps=EPS):
    out = (x - per_channel(mean, x.dim())) / torch.sqrt(per_channel(var, x.dim()) + eps)
    if weight is not None:
        out = out * per_channel(weight, x.dim()) + per_channel(bias, x.dim())
    return out


# ---------------------------------------------------------------- LN / IN / GN (also against torch's)


@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (3, 6, 7), (5, 6)])
def test_layer_norm_matches_formula_and_torch(shape):
    m = randomize_(LayerNormNd(shape[1], dtype=D))
    x = sample(*shape)
    expected = standardize_groups(x, 1) * per_channel(m.weight, x.dim()) + per_channel(m.bias, x.dim())
    torch_ln = F.layer_norm(x, x.shape[1:], eps=EPS) * per_channel(m.weight, x.dim()) + per_channel(m.bias, x.dim())
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(x), expected)
        torch.testing.assert_close(m(x), torch_ln)


@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (3, 6, 7)])
def test_instance_norm_matches_formula_and_torch(shape):
    m = randomize_(InstanceNormNd(shape[1], dtype=D))
    x = sample(*shape)
    expected = standardize_groups(x, shape[1]) * per_channel(m.weight, x.dim()) + per_channel(m.bias, x.dim())
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(x), expected)
        torch.testing.assert_close(m(x), F.instance_norm(x, weight=m.weight, bias=m.bias, eps=EPS))


def test_instance_norm_rejects_inputs_without_positions():
    m = InstanceNormNd(4)
    with pytest.raises(ValueError, match="at least one spatial dim"):
        m(torch.randn(3, 4))
    with pytest.raises(ValueError, match="more than 1 spatial value"):
        m(torch.randn(3, 4, 1, 1))


@pytest.mark.parametrize("cpg", [4, 8])
def test_group_norm_by_channels_per_group(cpg):
    c = 16
    m = randomize_(GroupNormCPG(c, channels_per_group=cpg, dtype=D))
    assert m.num_groups == c // cpg
    x = sample(3, c, 4, 5)
    expected = standardize_groups(x, c // cpg) * per_channel(m.weight, 4) + per_channel(m.bias, 4)
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(x), expected)
        torch.testing.assert_close(m(x), F.group_norm(x, c // cpg, m.weight, m.bias, EPS))


def test_group_norm_non_divisible_channels_error_names_values():
    with pytest.raises(ValueError, match=r"num_features=12 .*channels_per_group=8"):
        GroupNormCPG(12, channels_per_group=8)


# ---------------------------------------------------------------- PN


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (3, 5, 7), (6, 5)])
def test_positional_norm_matches_formula(shape):
    m = randomize_(PositionalNorm(shape[1], dtype=D))
    x = sample(*shape)
    c = shape[1]
    mean = x.sum(1, keepdim=True) / c
    var = ((x - mean) ** 2).sum(1, keepdim=True) / (c - 1)  # unbiased, as the authors' code
    expected = (x - mean) / torch.sqrt(var + EPS) * per_channel(m.weight, x.dim()) + per_channel(m.bias, x.dim())
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m(x), expected)


def test_positional_norm_needs_two_channels():
    with pytest.raises(ValueError, match="num_features >= 2"):
        PositionalNorm(1)


# ---------------------------------------------------------------- SN


def switchable_reference(x, mean_logits, var_logits, weight, bias, bn_stats=None, eps=EPS):
    """SN from plain sums: IN (unbiased var), LN and BN formed from IN moments as in the authors' code."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    s = flat.shape[-1]
    s1, s2 = flat.sum(-1, keepdim=True), (flat * flat).sum(-1, keepdim=True)
    mean_in = s1 / s
    var_in = (s2 - s1 * s1 / s) / (s - 1)
    second = var_in + mean_in**2
    mean_ln = mean_in.sum(1, keepdim=True) / c
    var_ln = second.sum(1, keepdim=True) / c - mean_ln**2
    if bn_stats is None:
        mean_bn = mean_in.sum(0, keepdim=True) / n
        var_bn = second.sum(0, keepdim=True) / n - mean_bn**2
    else:
        mean_bn, var_bn = (t.view(1, c, 1) for t in bn_stats)
    wm = torch.exp(mean_logits) / torch.exp(mean_logits).sum()
    wv = torch.exp(var_logits) / torch.exp(var_logits).sum()
    mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    out = ((flat - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return out * per_channel(weight, x.dim()) + per_channel(bias, x.dim()), mean_bn.flatten(), var_bn.flatten()


@pytest.mark.parametrize("shape", [(4, 3, 5, 4), (5, 3, 6)])
def test_switchable_norm_train_running_stats_and_eval(shape):
    m = randomize_(SwitchableNorm(shape[1], momentum=0.1, dtype=D))
    x = sample(*shape)
    expected, mean_bn, var_bn = switchable_reference(x, m.mean_weight, m.var_weight, m.weight, m.bias)
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m.running_mean, 0.1 * mean_bn)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * var_bn)  # no Bessel factor, authors' convention
    m.eval()
    x2 = sample(*shape)
    stats = (m.running_mean.clone(), m.running_var.clone())
    expected_eval, *_ = switchable_reference(x2, m.mean_weight, m.var_weight, m.weight, m.bias, bn_stats=stats)
    torch.testing.assert_close(m(x2), expected_eval)
    torch.testing.assert_close(m.running_mean, stats[0])


def test_switchable_norm_batch_average_mode():
    """momentum=None: averages of μ_BN and of μ²_BN + σ²_BN over all batches (the authors' batch average)."""
    m = SwitchableNorm(3, momentum=None, dtype=D)
    batches = [sample(4, 3, 5, 5), sample(4, 3, 5, 5) * 3 - 1, sample(4, 3, 5, 5) + 2]
    means, seconds = [], []
    for x in batches:
        _, mean_bn, var_bn = switchable_reference(x, m.mean_weight, m.var_weight, m.weight, m.bias)
        means.append(mean_bn)
        seconds.append(var_bn + mean_bn**2)
        m(x)
    mean = torch.stack(means).mean(0)
    torch.testing.assert_close(m.running_mean, mean)
    torch.testing.assert_close(m.running_var, torch.stack(seconds).mean(0) - mean**2)
    assert int(m.num_batches_tracked) == 3


def test_switchable_norm_without_bn_and_errors():
    m = randomize_(SwitchableNorm(3, using_bn=False, dtype=D))
    assert m.mean_weight.shape == (2,) and m.running_mean is None
    x = sample(4, 3, 4, 4)
    logits_m = torch.cat([m.mean_weight, torch.tensor([-torch.inf], dtype=D)])
    logits_v = torch.cat([m.var_weight, torch.tensor([-torch.inf], dtype=D)])
    expected, *_ = switchable_reference(x, logits_m, logits_v, m.weight, m.bias)
    m.eval()
    torch.testing.assert_close(m(x), expected)
    with pytest.raises(ValueError, match="at least one spatial dim"):
        m(torch.randn(4, 3, dtype=D))
    with pytest.raises(ValueError, match="more than 1 spatial value"):
        m(torch.randn(4, 3, 1, 1, dtype=D))


# ---------------------------------------------------------------- BCN


@pytest.mark.parametrize(
    "channels, groups", [(4, 1), (6, 1), (16, 4), (48, 12), (64, 16), (128, 32), (256, 32), (100, 25), (200, 25)]
)
def test_bcn_group_rule(channels, groups):
    assert bcn_num_groups(channels) == groups
    assert BatchChannelNorm(channels).num_groups == groups


def test_bcn_explicit_groups_must_divide():
    with pytest.raises(ValueError, match="num_groups=5 must be a positive divisor of num_features=16"):
        BatchChannelNorm(16, num_groups=5)


@pytest.mark.parametrize("shape", [(4, 8, 3, 5), (5, 8, 6), (6, 8)])
def test_bcn_train_and_eval(shape):
    m = randomize_(BatchChannelNorm(shape[1], num_groups=4, dtype=D))
    x = sample(*shape)
    mean, var, count = batch_stats(x)
    gw, gb = m.weight.view(1, 4, 1), m.bias.view(1, 4, 1)

    def after_bn(z):
        n = z.shape[0]
        out = standardize_groups(z, 4).reshape(n, 4, -1) * gw + gb
        return out.reshape(z.shape)

    expected = after_bn(bn_formula(x, mean, var, m.bn.weight, m.bn.bias))
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m.bn.running_var, 0.9 + 0.1 * var * count / (count - 1))
    m.eval()
    expected_eval = after_bn(bn_formula(x, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias))
    torch.testing.assert_close(m(x), expected_eval)


# ---------------------------------------------------------------- BIN


@pytest.mark.parametrize("shape", [(4, 5, 3, 4), (4, 5, 6)])
def test_bin_train_and_eval(shape):
    m = randomize_(BatchInstanceNorm(shape[1], dtype=D))
    with torch.no_grad():
        m.gate.copy_(torch.linspace(0, 1, shape[1], dtype=D))
    x = sample(*shape)
    mean, var, _ = batch_stats(x)
    w, b, g = (per_channel(t, x.dim()) for t in (m.weight, m.bias, m.gate))
    inst = standardize_groups(x, shape[1])
    expected = w * (g * bn_formula(x, mean, var) + (1 - g) * inst) + b
    torch.testing.assert_close(m(x), expected)
    m.eval()
    x2 = sample(*shape)
    expected_eval = w * (g * bn_formula(x2, m.bn.running_mean, m.bn.running_var) + (1 - g) * standardize_groups(x2, shape[1])) + b
    torch.testing.assert_close(m(x2), expected_eval)


def test_bin_gate_initialised_to_one_is_batch_norm():
    m = randomize_(BatchInstanceNorm(5, dtype=D))
    m.reset_parameters()
    assert torch.equal(m.gate, torch.ones(5, dtype=D))
    bn = nn.BatchNorm2d(5, dtype=D)
    x = sample(3, 5, 4, 4)
    torch.testing.assert_close(m(x), bn(x))


# ---------------------------------------------------------------- Table 3 ablations


def positional_formula(x, eps=EPS):
    c = x.shape[1]
    mean = x.sum(1, keepdim=True) / c
    var = ((x - mean) ** 2).sum(1, keepdim=True) / (c - 1)
    return (x - mean) / torch.sqrt(var + eps)


ABLATIONS = {
    LNBatchNorm: lambda x: F.layer_norm(x, x.shape[1:], eps=EPS),
    INBatchNorm: lambda x: F.instance_norm(x, eps=EPS),
    PNBatchNorm: positional_formula,
}


@pytest.mark.parametrize("cls", list(ABLATIONS))
@pytest.mark.parametrize("shape", [(4, 6, 3, 5), (4, 6, 7)])
def test_ablation_equals_prenorm_then_batchnorm(cls, shape):
    m = randomize_(cls(shape[1], dtype=D))
    bn = nn.BatchNorm1d(shape[1], dtype=D) if len(shape) == 3 else nn.BatchNorm2d(shape[1], dtype=D)
    bn.load_state_dict(m.state_dict())  # same parameters, buffers and keys as torch's BatchNorm
    pre = ABLATIONS[cls]
    for step in range(2):
        x = sample(*shape) * (step + 1)
        torch.testing.assert_close(m(x), bn(pre(x)))
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    m.eval(), bn.eval()
    x = sample(*shape)
    torch.testing.assert_close(m(x), bn(pre(x)))


def test_ablations_on_vectors_where_defined():
    x = sample(8, 6)
    for cls in (LNBatchNorm, PNBatchNorm):
        m = cls(6, dtype=D)
        bn = nn.BatchNorm1d(6, dtype=D)
        torch.testing.assert_close(m(x), bn(ABLATIONS[cls](x) if cls is PNBatchNorm else F.layer_norm(x, (6,), eps=EPS)))
    with pytest.raises(ValueError, match="INBatchNorm expects input"):
        INBatchNorm(6)(x)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["sn", "bcn", "bin", "pn", "lnbn", "inbn", "pnbn"])  # ubn: test_norms_ubn.py
def test_gradients_match_finite_differences(name):
    from l2bn.norms import create_norm

    m = randomize_(create_norm(name, 4, dtype=D))
    x = sample(2, 4, 2, 2).requires_grad_(True)
    params = tuple(p for p in m.parameters())
    assert torch.autograd.gradcheck(lambda inp, *ps: m(inp), (x, *params), eps=1e-6, atol=1e-5)
