"""Identity-layer experiments (Fig. 2, 4, 5) against independent numpy float64 formulas, and the paper's claims."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from l2bn.cli import main
from l2bn.geometry import (
    DEFAULT_CENTERS,
    DEFAULT_INTRA_CLASS,
    DEFAULT_OTHERS,
    equiangular_limit,
    identity_layer,
    intra_class_spread,
    min_center_angles,
    propagate,
    write_figures,
)

EPS = 1e-5


def np_bn(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / np.sqrt(x.var(0) + EPS)  # biased batch variance, γ = 1, β = 0


def np_l2bn(x: np.ndarray) -> np.ndarray:
    d = x.shape[1]
    return np_bn(math.sqrt(d) * x / np.linalg.norm(x, axis=1, keepdims=True))


def np_min_angle(x: np.ndarray) -> float:
    best = math.inf
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j:
                cos = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
                best = min(best, math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    return best


def _random_centers(seed: int, k: int = 3, d: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(k, d, generator=g, dtype=torch.float64) if seed % 2 else torch.randn(k, d, generator=g, dtype=torch.float64)
    return base * torch.exp(torch.randn(k, 1, generator=g, dtype=torch.float64))  # unequal norms


@pytest.mark.parametrize("norm", ["bn", "l2bn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layers_and_angles_match_numpy(norm, seed):
    c = _random_centers(seed, k=4, d=3)
    layer = np_bn if norm == "bn" else np_l2bn
    states = propagate(c, 4, norm)
    x = c.numpy()
    expected = [np_min_angle(x)]
    for state in states[1:]:
        x = layer(x)
        np.testing.assert_allclose(state.numpy(), x, rtol=1e-9, atol=1e-12)
        expected.append(np_min_angle(x))
    np.testing.assert_allclose(min_center_angles(c, 4, norm), expected, rtol=1e-9, atol=1e-9)


def test_bn_moves_centers_once_then_stays():
    for seed in range(12):
        angles = min_center_angles(_random_centers(seed), 10, "bn")
        # BN's eps (1e-5) nudges the first layer a little where a dimension has tiny variance; after that
        # every layer meets zero mean and unit variance and is the identity
        assert max(abs(a - angles[1]) for a in angles[1:]) < 0.05, (seed, angles)
        assert max(abs(a - angles[2]) for a in angles[2:]) < 1e-6, (seed, angles)
    default = min_center_angles(DEFAULT_CENTERS, 10, "bn")
    assert default[1] > default[0] + 20  # the paper's picture: one jump (11.5° → 44.0°) ...
    assert default[-1] < 50  # ... and no further progress


def test_l2bn_keeps_growing_toward_120_for_three_classes_in_2d():
    limit = equiangular_limit(3, 2)
    assert limit == pytest.approx(120.0)
    for seed in range(12):
        angles = min_center_angles(_random_centers(seed), 40, "l2bn")
        assert all(b >= a - 1e-9 for a, b in zip(angles, angles[1:])), (seed, angles)
        assert angles[-1] == pytest.approx(limit, abs=0.01), seed
        assert angles[-1] > min_center_angles(_random_centers(seed), 40, "bn")[-1] - 1e-6
    default = min_center_angles(DEFAULT_CENTERS, 12, "l2bn")
    assert all(b > a for a, b in zip(default, default[1:]))  # strictly growing at every layer
    assert default[12] > 119.5


def test_equiangular_limit():
    assert equiangular_limit(2, 1) == pytest.approx(180.0)
    assert equiangular_limit(4, 3) == pytest.approx(math.degrees(math.acos(-1 / 3)))
    assert equiangular_limit(5, 2) is None


def test_intra_class_vectors_diverge_under_bn_not_l2bn():
    bn = intra_class_spread(DEFAULT_INTRA_CLASS, DEFAULT_OTHERS, 3, "bn")
    l2 = intra_class_spread(DEFAULT_INTRA_CLASS, DEFAULT_OTHERS, 3, "l2bn")
    # float64's floor for the angle of parallel vectors: one ulp in cos θ is θ = sqrt(2·2⁻⁵²) rad ≈ 1.2e-6°
    floor = math.degrees(math.sqrt(2 * torch.finfo(torch.float64).eps))
    assert bn[0] <= floor and l2[0] <= floor
    assert all(a > 90 for a in bn[1:])  # the same direction is torn apart
    assert all(a <= 2 * floor for a in l2)  # equal after l2 normalisation, hence equal after BN (to rounding)
    # independent check of BN's first layer on the whole batch
    x = np_bn(np.concatenate([DEFAULT_INTRA_CLASS.numpy(), DEFAULT_OTHERS.numpy()]))[:4]
    spread = max(
        math.degrees(math.acos(np.clip(x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]), -1, 1)))
        for i in range(4) for j in range(4)
    )
    assert bn[1] == pytest.approx(spread, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    direction = torch.rand(1, 6, generator=g, dtype=torch.float64)
    members = direction * torch.tensor([[0.1], [1.0], [7.0]], dtype=torch.float64)
    others = torch.rand(5, 6, generator=g, dtype=torch.float64)
    assert intra_class_spread(members, others, 2, "bn")[1] > 1.0
    assert max(intra_class_spread(members, others, 2, "l2bn")) <= 2 * floor  # parallel to rounding


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"norm must be one of \('bn', 'l2bn'\), got 'ln'"):
        identity_layer(DEFAULT_CENTERS, "ln")
    with pytest.raises(ValueError, match="k >= 2"):
        min_center_angles(DEFAULT_CENTERS[:1], 3, "bn")
    with pytest.raises(ValueError, match="num_layers must be >= 0, got -1"):
        propagate(DEFAULT_CENTERS, -1, "bn")


def test_write_figures_3d_centers_skip_arrows(tmp_path):
    paths = write_figures(tmp_path, _random_centers(3, k=4, d=3), 3)
    names = sorted(p.name for p in paths)
    assert names == ["inter_class_min_angle.png", "intra_class_arrows.png", "intra_class_spread.png"]


def test_cli_prints_tables_and_writes_pngs(tmp_path, capsys):
    assert main(["geometry", "--out", str(tmp_path / "fig"), "--num-layers", "4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    row4 = next(line for line in lines if line.split()[:1] == ["4"])  # first table, layer 4
    bn, l2 = map(float, row4.split()[1:])
    ref_bn, ref_l2 = (min_center_angles(DEFAULT_CENTERS, 4, n)[4] for n in ("bn", "l2bn"))
    assert bn == pytest.approx(ref_bn, abs=0.01) and l2 == pytest.approx(ref_l2, abs=0.01)
    for name in ("inter_class_min_angle", "inter_class_arrows", "intra_class_spread", "intra_class_arrows"):
        path = tmp_path / "fig" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert f"wrote {path}" in out
    assert main(["geometry", "--out", str(tmp_path / "g"), "--num-layers", "2", "--centers", "1,0;0,1;1,1"]) == 0
    assert "    0      45.00     45.00" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["geometry", "--out", str(tmp_path), "--centers", "1,a;2"])


@pytest.mark.parametrize("argv, message", [
    (["--num-layers", "-1"], "expected an integer >= 0, got '-1'"),
    (["--centers", "0,0;1,1"], "every center must be finite and non-zero"),
    (["--centers", "1,nan;1,1"], "every center must be finite and non-zero"),
])
def test_cli_rejects_bad_arguments_without_traceback(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["geometry", "--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_center_mapped_to_zero_is_a_clear_error(tmp_path, capsys):
    # three 1-D centers 1, 2, 3: BN maps the middle one to exactly 0, which has no direction
    with pytest.raises(ValueError, match=r"centers \[1\] are zero vectors after bn layer 1"):
        min_center_angles(torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64), 2, "bn")
    assert main(["geometry", "--out", str(tmp_path), "--centers", "1;2;3"]) == 1
    assert "error: centers [1] are zero vectors after bn layer 1" in capsys.readouterr().err


def test_figures_leave_the_matplotlib_backend_alone_and_use_the_reference_path(tmp_path, monkeypatch):
    """Notebook users keep their backend; the 3×2 batches never ask for the compiled kernel."""
    import subprocess
    import sys
    from pathlib import Path

    import l2bn.kernels.dispatch as dispatch

    calls = []
    monkeypatch.setattr(dispatch, "auto_impl", lambda x: calls.append(x) or "reference")
    identity_layer(DEFAULT_CENTERS, "l2bn")
    assert calls == []  # impl="reference" is asked for explicitly
    code = (
        "import matplotlib; matplotlib.use('svg')\n"
        "from l2bn.geometry import write_figures\n"
        f"write_figures({str(tmp_path)!r}, num_layers=2)\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.glob("*.png"))) == 4
