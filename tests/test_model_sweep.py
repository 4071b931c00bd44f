"""The sweeps' comparison rule (tests/model_sweep.py): relative to the reference, or no further from it than
FLOOR_FACTOR times another float64 path where rounding alone exceeds the relative tolerance."""
import pytest
import torch

from model_sweep import FLOOR_FACTOR, TOL, _errors, _excess


def test_an_error_within_the_relative_tolerance_passes_and_one_beyond_it_is_named():
    want = [torch.tensor([1.0, -2.0])]
    assert _excess([want[0] + 0.5 * TOL], want, "out") == []
    (message,) = _excess([want[0] + 3 * TOL], want, "out")
    assert message.startswith("out[0]: max error")


def test_the_floor_of_another_path_widens_the_bound_only_to_its_multiple():
    want = [torch.tensor([1.0, 1.0], dtype=torch.float64)]
    other = [want[0] + 1e-4]  # an ill-conditioned model: the second path is 1e-4 away
    floor = _errors(other, want)
    assert floor == pytest.approx([1e-4], rel=1e-9)
    assert _excess([want[0] + 0.9 * FLOOR_FACTOR * 1e-4], want, "out", floor=floor) == []
    assert len(_excess([want[0] + 1.1 * FLOOR_FACTOR * 1e-4], want, "out", floor=floor)) == 1
    assert len(_excess([want[0] + 1e-4], want, "out", scale=1.0)) == 1  # without the floor: beyond TOL


def test_shapes_and_the_references_finiteness_are_checked():
    with pytest.raises(AssertionError, match="shape"):
        _excess([torch.zeros(3)], [torch.zeros(2)], "out")
    with pytest.raises(AssertionError, match="not finite"):
        _excess([torch.zeros(1)], [torch.tensor([float("nan")])], "out")
