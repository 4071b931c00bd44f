"""UBN (reconstruction): condensation measure, threshold-gated running statistics, calibration numerics."""
from __future__ import annotations

import itertools

import pytest
import torch

from l2bn.norms import DEFAULT_CONDENSATION_THRESHOLD, UnifiedBatchNorm, create_norm, feature_condensation

D = torch.float64
EPS = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def brute_force_condensation(x: torch.Tensor) -> float:
    """Mean cosine similarity over all distinct pairs, one pair at a time (zero vectors: similarity 0)."""
    flat = x.reshape(x.shape[0], -1).to(D)
    sims = []
    for i, j in itertools.permutations(range(flat.shape[0]), 2):
        a, b = flat[i], flat[j]
        na, nb = a.norm(), b.norm()
        sims.append(0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb)))
    return sum(sims) / len(sims)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (7, 5, 3, 2), (6, 9), (5, 4, 6)])
def test_condensation_matches_pairwise_loop(shape):
    x = torch.randn(*shape, dtype=D) + 0.3
    assert float(feature_condensation(x)) == pytest.approx(brute_force_condensation(x), abs=1e-12)


def test_condensation_zero_sample_and_extremes():
    x = torch.randn(5, 3, 2, 2, dtype=D)
    x[2] = 0
    assert float(feature_condensation(x)) == pytest.approx(brute_force_condensation(x), abs=1e-12)
    same = torch.randn(1, 3, 2, 2).expand(4, -1, -1, -1) * torch.tensor([1.0, 2.0, 3.0, 0.5]).view(4, 1, 1, 1)
    assert float(feature_condensation(same)) == pytest.approx(1.0, abs=1e-6)
    assert feature_condensation(torch.randn(1, 3, 2, 2)) is None


def test_condensation_half_precision_is_accumulated_in_float32():
    x = torch.randn(6, 4, 3, 3)
    value = feature_condensation(x.half())
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(brute_force_condensation(x.half().float()), abs=1e-5)


def centered(m: UnifiedBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Centering calibration x + w_c * (per-sample, per-channel mean over positions)."""
    dims = tuple(range(2, x.dim()))
    pooled = x.sum(dims, keepdim=True) / x[0, 0].numel() if dims else x
    return x + m.centering_weight.view((1, -1) + (1,) * (x.dim() - 2)) * pooled


def ubn_formula(m: UnifiedBatchNorm, x: torch.Tensor, stats=None):
    """Reference UBN forward in float64; returns output and the batch mean / biased variance / count."""
    dims = tuple(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xc = centered(m, x)
    c = x.shape[1]
    flat = xc.transpose(0, 1).reshape(c, -1)
    count = flat.shape[1]
    mean = flat.sum(1) / count
    var = ((flat - mean[:, None]) ** 2).sum(1) / count
    use_mean, use_var = (mean, var) if stats is None else stats
    xh = (xc - use_mean.view(shape)) / torch.sqrt(use_var.view(shape) + EPS)
    pooled_h = xh.sum(dims, keepdim=True) / x[0, 0].numel() if dims else xh
    gate = 1 / (1 + torch.exp(-(m.scaling_weight.view(shape) * pooled_h + m.scaling_bias.view(shape))))
    out = xh * gate * m.weight.view(shape) + m.bias.view(shape)
    return out, mean, var, count


def randomized_ubn(c: int, **kwargs) -> UnifiedBatchNorm:
    m = UnifiedBatchNorm(c, dtype=D, **kwargs)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


@pytest.mark.parametrize("shape", [(6, 4, 3, 5), (6, 4, 7), (8, 4)])
def test_ubn_train_update_and_eval(shape):
    m = randomized_ubn(shape[1], condensation_threshold=0.99)
    x = torch.randn(*shape, dtype=D) * 1.5 - 0.4
    expected, mean, var, count = ubn_formula(m, x)
    torch.testing.assert_close(m(x), expected)
    expected_condensation = brute_force_condensation(centered(m, x).detach())
    assert float(m.last_condensation) == pytest.approx(expected_condensation, abs=1e-10)
    torch.testing.assert_close(m.running_mean, 0.1 * mean)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * var * count / (count - 1))
    assert int(m.num_batches_tracked) == 1
    m.eval()
    x2 = torch.randn(*shape, dtype=D)
    expected_eval, *_ = ubn_formula(m, x2, stats=(m.running_mean, m.running_var))
    measured, stats = m.last_condensation, (m.running_mean.clone(), m.running_var.clone())
    torch.testing.assert_close(m(x2), expected_eval)
    assert m.last_condensation is measured  # eval neither measures condensation nor moves the statistics
    assert torch.equal(m.running_mean, stats[0]) and torch.equal(m.running_var, stats[1])


def test_ubn_default_init_is_bn_scaled_by_sigmoid_one():
    m = UnifiedBatchNorm(3, dtype=D)
    bn = torch.nn.BatchNorm2d(3, dtype=D)
    x = torch.randn(4, 3, 5, 5, dtype=D)
    torch.testing.assert_close(m(x), bn(x) * torch.sigmoid(torch.tensor(1.0, dtype=D)))
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert m.condensation_threshold == DEFAULT_CONDENSATION_THRESHOLD


def test_ubn_running_stats_frozen_above_threshold_updated_below():
    m = UnifiedBatchNorm(3, dtype=D, condensation_threshold=0.5)
    base = torch.randn(1, 3, 4, 4, dtype=D)
    condensed = base + 0.01 * torch.randn(8, 3, 4, 4, dtype=D)
    out = m(condensed)
    assert float(m.last_condensation) > 0.99
    assert torch.equal(m.running_mean, torch.zeros(3, dtype=D))
    assert torch.equal(m.running_var, torch.ones(3, dtype=D))
    assert int(m.num_batches_tracked) == 0
    torch.testing.assert_close(out, ubn_formula(m, condensed)[0])  # still normalised with batch statistics

    diverse = torch.randn(8, 3, 4, 4, dtype=D) + 0.2
    m(diverse)
    assert float(m.last_condensation) < 0.5
    _, mean, var, count = ubn_formula(m, diverse)
    torch.testing.assert_close(m.running_mean, 0.1 * mean)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * var * count / (count - 1))
    assert int(m.num_batches_tracked) == 1


def test_ubn_cumulative_average_counts_only_updating_batches():
    m = UnifiedBatchNorm(2, dtype=D, momentum=None, condensation_threshold=0.5)
    a = torch.randn(6, 2, 3, 3, dtype=D)
    b = torch.randn(6, 2, 3, 3, dtype=D) * 2 + 1
    condensed = torch.randn(1, 2, 3, 3, dtype=D).expand(6, -1, -1, -1) + 1e-3 * torch.randn(6, 2, 3, 3, dtype=D)
    for x in (a, condensed, b):
        m(x)
    assert int(m.num_batches_tracked) == 2
    means = [ubn_formula(m, x)[1] for x in (a, b)]
    torch.testing.assert_close(m.running_mean, (means[0] + means[1]) / 2)


def test_ubn_does_not_modify_input_and_backpropagates_to_calibration():
    m = randomized_ubn(4)
    x = torch.randn(5, 4, 3, 3, dtype=D, requires_grad=True)
    before = x.detach().clone()
    m(x).square().sum().backward()
    assert torch.equal(x.detach(), before)
    for p in (m.centering_weight, m.scaling_weight, m.scaling_bias, m.weight, m.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_ubn_errors_and_registry():
    with pytest.raises(ValueError, match=r"condensation_threshold .*\[-1, 1\], got 1.5"):
        UnifiedBatchNorm(3, condensation_threshold=1.5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        UnifiedBatchNorm(3)(torch.randn(1, 3))
    m = create_norm("UBN", 3, condensation_threshold=0.3)
    assert isinstance(m, UnifiedBatchNorm) and m.condensation_threshold == 0.3


def test_ubn_threshold_is_strict_exceeding_freezes_equal_updates():
    """Freeze only when condensation > τ: at τ equal to the batch's value the statistics still move."""
    x = torch.randn(6, 3, 4, 4, dtype=D) + 0.5
    value = float(feature_condensation(x))  # centering weight is 0 at init, so x_c = x exactly
    assert value == pytest.approx(brute_force_condensation(x), abs=1e-12)
    at = UnifiedBatchNorm(3, dtype=D, condensation_threshold=value)
    at(x)
    assert int(at.num_batches_tracked) == 1 and not torch.equal(at.running_mean, torch.zeros(3, dtype=D))
    below = UnifiedBatchNorm(3, dtype=D, condensation_threshold=value - 1e-9)
    below(x)
    assert int(below.num_batches_tracked) == 0 and torch.equal(below.running_mean, torch.zeros(3, dtype=D))
