"""Angle metrics against a brute-force float64 reading of the paper's supplementary eq. (1)-(3)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from l2bn.metrics import (
    AngleAccumulator,
    AngleStats,
    FeatureHook,
    IntraAngleAccumulator,
    angle_stats,
    extract_features,
    inter_angle,
    intra_angle,
    pairwise_angles,
)


# ------------------------------------------------------------------------------ brute-force reference
def _angle(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def brute_force(features: torch.Tensor, labels: torch.Tensor, centers: np.ndarray | None = None):
    """Loops over samples and classes, numpy float64, straight from the formulas."""
    x = features.double().numpy()
    y = labels.tolist()
    if centers is None:
        classes = sorted(set(y))
        centers = {}
        for c in classes:
            members = [x[n] / np.linalg.norm(x[n]) for n in range(len(y)) if y[n] == c]
            centers[c] = sum(members) / len(members)
    else:
        centers = {c: centers[c] for c in range(len(centers))}
    intra = sum(_angle(x[n], centers[y[n]]) for n in range(len(y))) / len(y)
    mins = []
    for i in centers:
        mins.append(min(_angle(centers[i], centers[j]) for j in centers if j != i))
    inter = sum(mins) / len(mins)
    return intra, inter, centers


def _uneven_data(seed: int = 0, n_per_class=(3, 17, 8, 30, 1), d: int = 6):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(len(n_per_class), d, generator=g) * 2
    xs, ys = [], []
    for c, n in enumerate(n_per_class):
        x = means[c] + torch.randn(n, d, generator=g)
        x = x * torch.exp(torch.randn(n, 1, generator=g) * 1.5)  # norms spread over orders of magnitude
        xs.append(x)
        ys.append(torch.full((n,), c))
    perm = torch.randperm(sum(n_per_class), generator=g)
    return torch.cat(xs)[perm].double(), torch.cat(ys)[perm]


# ------------------------------------------------------------------------------------------- one-shot
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_uneven_classes_and_norms(seed):
    x, y = _uneven_data(seed)
    stats = angle_stats(x, y)
    intra, inter, centers = brute_force(x, y)
    assert isinstance(stats, AngleStats)
    assert stats.intra == pytest.approx(intra, rel=1e-10)
    assert stats.inter == pytest.approx(inter, rel=1e-10)
    assert stats.iir == pytest.approx(intra / inter, rel=1e-10)
    assert stats.centers.dtype == torch.float64
    for c, center in centers.items():
        np.testing.assert_allclose(stats.centers[c].numpy(), center, rtol=1e-12, atol=1e-14)
    assert stats.counts.tolist() == [3, 17, 8, 30, 1]
    assert stats.num_skipped == 0
    # the cone angle: each feature against the mean of the class centers (every class weighs the same)
    mean_center = sum(centers.values()) / len(centers)
    x64 = x.numpy()
    cone = sum(_angle(row, mean_center) for row in x64) / len(x64)
    assert stats.cone == pytest.approx(cone, rel=1e-10)


def test_cone_angle_tells_a_contracting_cone_from_separating_classes():
    """Two classes at ±θ from one axis: shrinking θ shrinks intra, inter and the cone together (a contracting
    cone); the cone angle of features that all point one way is 0, and undefined where the centers cancel."""
    def two_classes(theta: float) -> AngleStats:
        a = torch.tensor([[math.cos(theta), math.sin(theta) + s, 0.0] for s in (-0.05, 0.05)], dtype=torch.float64)
        b = a * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
        return angle_stats(torch.cat([a, b]), torch.tensor([0, 0, 1, 1]))

    wide, narrow = two_classes(0.6), two_classes(0.2)
    assert narrow.inter < wide.inter and narrow.cone < wide.cone
    same = angle_stats(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]))
    assert same.cone == 0.0
    opposite = angle_stats(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([0, 1]))
    assert math.isnan(opposite.cone)


def test_float32_input_accumulates_in_float64():
    x, y = _uneven_data(3)
    ref_intra, ref_inter, _ = brute_force(x.float(), y)
    stats = angle_stats(x.float(), y)
    assert stats.intra == pytest.approx(ref_intra, rel=1e-9)
    assert stats.inter == pytest.approx(ref_inter, rel=1e-9)


def test_invariant_to_per_sample_positive_scaling():
    x, y = _uneven_data(4)
    scale = torch.exp(torch.randn(x.shape[0], 1) * 3)
    a, b = angle_stats(x, y), angle_stats(x * scale, y)
    assert b.intra == pytest.approx(a.intra, rel=1e-10)
    assert b.inter == pytest.approx(a.inter, rel=1e-10)
    torch.testing.assert_close(b.centers, a.centers, rtol=1e-10, atol=1e-12)


def test_orthogonal_identical_directions_give_90_and_0():
    d = 4
    eye = torch.eye(d, dtype=torch.float64)
    x = torch.cat([eye[c].repeat(5, 1) * torch.arange(1, 6, dtype=torch.float64).unsqueeze(1) for c in range(d)])
    y = torch.arange(d).repeat_interleave(5)
    stats = angle_stats(x, y)
    assert stats.intra == 0.0
    assert stats.inter == pytest.approx(90.0, abs=1e-12)
    assert stats.iir == 0.0


def test_intra_is_mean_over_samples_not_over_classes():
    # class 0: one sample at its center (0°); class 1: two samples at ±30° from the y axis, its center.
    s, c = math.sin(math.radians(30)), math.cos(math.radians(30))
    x = torch.tensor([[1.0, 0.0], [s, c], [-3 * s, 3 * c]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    assert angle_stats(x, y).intra == pytest.approx(20.0, abs=1e-9)  # (0 + 30 + 30) / 3, not (0 + 30) / 2


def test_inter_is_mean_of_nearest_center_angles():
    deg = [0.0, 10.0, 100.0]  # nearest: 10, 10, 90 → mean 36.67
    c = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in deg], dtype=torch.float64)
    assert inter_angle(c) == pytest.approx((10 + 10 + 90) / 3, abs=1e-9)
    torch.testing.assert_close(pairwise_angles(c)[0, 2], torch.tensor(100.0, dtype=torch.float64))


def test_test_set_uses_train_centers():
    xtr, ytr = _uneven_data(5)
    xte, yte = _uneven_data(6, n_per_class=(4, 2, 9, 5, 3))
    train = angle_stats(xtr, ytr)
    test = angle_stats(xte, yte, train.centers)
    intra, inter, _ = brute_force(xte, yte, train.centers.numpy())
    assert test.intra == pytest.approx(intra, rel=1e-10)
    assert test.inter == pytest.approx(train.inter, rel=1e-12)  # the inter-angle is that of the given centers
    assert test.inter == pytest.approx(inter, rel=1e-10)
    torch.testing.assert_close(test.centers, train.centers)
    assert test.intra != pytest.approx(angle_stats(xte, yte).intra, rel=1e-3)  # the centers really were reused


# ------------------------------------------------------------------------------------------- edge cases
def test_absent_class_has_zero_center_and_is_left_out_of_inter():
    x, y = _uneven_data(9, n_per_class=(5, 6, 7))
    y = torch.where(y == 1, torch.tensor(3), y)  # classes 0, 2, 3 present; 1 absent
    stats = angle_stats(x, y, num_classes=5)
    intra, inter, _ = brute_force(x, y)
    assert stats.centers.shape == (5, x.shape[1])
    assert torch.all(stats.centers[1] == 0) and torch.all(stats.centers[4] == 0)
    assert stats.counts.tolist() == [5, 0, 7, 6, 0]
    assert stats.inter == pytest.approx(inter, rel=1e-10)
    assert stats.intra == pytest.approx(intra, rel=1e-10)
    # a test sample of a class with no train center has no defined angle: clear error
    with pytest.raises(ValueError, match=r"classes \[1\] have samples but no center"):
        angle_stats(x[:3], torch.tensor([0, 1, 2]), stats.centers)


def test_zero_vectors_are_skipped_and_counted():
    x, y = _uneven_data(10, n_per_class=(6, 6, 6))
    x0 = x.clone()
    x0[[2, 7]] = 0.0
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[[2, 7]] = False
    stats = angle_stats(x0, y)
    ref = angle_stats(x[keep], y[keep])
    assert stats.num_skipped == 2
    assert stats.intra == pytest.approx(ref.intra, rel=1e-12)
    assert stats.inter == pytest.approx(ref.inter, rel=1e-12)
    assert int(stats.counts.sum()) == len(x) - 2
    with pytest.raises(ValueError, match="at least one non-zero"):
        intra_angle(torch.zeros(3, 2), torch.tensor([0, 0, 1]), torch.eye(2))


def test_single_class_inter_undefined_is_an_error_and_intra_still_available():
    x = torch.randn(10, 3)
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="at least 2 classes"):
        angle_stats(x, y)
    center = (x.double() / x.double().norm(dim=1, keepdim=True)).mean(0, keepdim=True)
    got = intra_angle(x, y, center)
    ref = sum(_angle(x[n].double().numpy(), center[0].numpy()) for n in range(10)) / 10
    assert got == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match="at least 2 classes"):
        inter_angle(center)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise(bad):
    x, y = _uneven_data(11, n_per_class=(4, 4))
    x[5, 1] = bad
    with pytest.raises(ValueError, match=r"NaN or inf in 1 sample\(s\) \(first at index 5\)"):
        angle_stats(x, y)
    acc = AngleAccumulator(2)
    with pytest.raises(ValueError, match="NaN or inf"):
        acc.update(x, y)


def test_bad_arguments_name_the_value():
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got values in \[0, 5\]"):
        angle_stats(x, torch.tensor([0, 1, 5, 0, 1, 0]), num_classes=2)
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        angle_stats(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        angle_stats(x, torch.zeros(6))
    with pytest.raises(ValueError, match="dimension 3 but centers have 4"):
        angle_stats(x, torch.tensor([0, 1, 0, 1, 0, 1]), torch.eye(4)[:2])
    with pytest.raises(ValueError, match="at least one sample"):
        angle_stats(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_identical_centers_give_inter_zero_and_infinite_iir():
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])  # class 1's center points along (1, 1) as class 0's does
    stats = angle_stats(x, y)
    assert stats.inter == pytest.approx(0.0, abs=1e-6)
    assert stats.intra == pytest.approx(22.5, abs=1e-9)
    assert stats.iir == math.inf or stats.iir > 1e6


def test_class_whose_unit_vectors_cancel_has_no_center_and_a_clear_error():
    # class 0: opposite directions, so the mean unit vector is exactly zero although the class has samples
    x = torch.tensor([[1.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"classes \[0\] have samples but no center .*cancel out"):
        angle_stats(x, y)
    acc = AngleAccumulator(3)
    acc.update(x, y)
    assert acc.counts.tolist() == [2, 2, 1] and torch.all(acc.centers()[0] == 0)
    assert acc.inter() == pytest.approx(45.0, abs=1e-9)  # only classes 1 and 2 have a center


def test_bad_centers_are_named():
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    centers = torch.eye(2)
    centers[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"centers contain NaN or inf in 1 row\(s\) \(first at index 1\)"):
        angle_stats(x, y, centers)
    with pytest.raises(ValueError, match=r"centers must be a \(num_classes, d\) tensor, got list"):
        angle_stats(x, y, [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"centers must be a \(num_classes, d\) tensor, got \(2,\)"):
        IntraAngleAccumulator(torch.ones(2))


# -------------------------------------------------------------------------------------------- streaming
def test_streaming_equals_one_shot():
    x, y = _uneven_data(12, n_per_class=(7, 40, 13, 2, 21))
    one = angle_stats(x, y)
    acc = AngleAccumulator(5)
    for xb, yb in zip(x.split(9), y.split(9)):
        acc.update(xb.float(), yb)
    torch.testing.assert_close(acc.centers(), one.centers, rtol=1e-6, atol=1e-7)  # batches fed as float32
    acc = AngleAccumulator(5)
    for xb, yb in zip(x.split(9), y.split(9)):
        acc.update(xb, yb)
    torch.testing.assert_close(acc.centers(), one.centers, rtol=1e-12, atol=1e-14)
    assert acc.inter() == pytest.approx(one.inter, rel=1e-12)
    second = acc.intra_pass()
    for xb, yb in zip(x.split(11), y.split(11)):
        second.update(xb, yb)
    stats = second.compute()
    assert stats.intra == pytest.approx(one.intra, rel=1e-12)
    assert stats.inter == pytest.approx(one.inter, rel=1e-12)
    assert stats.iir == pytest.approx(one.iir, rel=1e-12)
    assert stats.counts.tolist() == one.counts.tolist()


def test_streaming_with_given_centers_and_preset_dim():
    x, y = _uneven_data(13)
    centers = angle_stats(*_uneven_data(14)).centers
    acc = IntraAngleAccumulator(centers)
    for xb, yb in zip(x.split(5), y.split(5)):
        acc.update(xb, yb)
    assert acc.intra() == pytest.approx(angle_stats(x, y, centers).intra, rel=1e-12)
    empty = AngleAccumulator(3, dim=4)
    assert empty.centers().shape == (3, 4) and torch.all(empty.centers() == 0)
    empty.all_reduce()  # no process group: a no-op
    with pytest.raises(ValueError, match="no features seen"):
        AngleAccumulator(3).centers()
    with pytest.raises(ValueError, match="dimension 5, earlier batches had 4"):
        empty.update(torch.randn(2, 5), torch.tensor([0, 1]))


def _rank_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        x, y = _uneven_data(15)
        mine = slice(0, 20) if rank == 0 else slice(20, None)
        # rank 1 starts without features in its first pass; dim= lets it take part in the reduce
        acc = AngleAccumulator(5, dim=x.shape[1])
        acc.update(x[mine], y[mine])
        acc.all_reduce()
        second = acc.intra_pass()
        second.update(x[mine], y[mine])
        second.all_reduce()
        stats = second.compute()
        torch.save({"centers": acc.centers(), "intra": stats.intra, "inter": stats.inter,
                    "counts": stats.counts, "skipped": stats.num_skipped}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    x, y = _uneven_data(15)
    one = angle_stats(x, y)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["centers"], one.centers, rtol=1e-12, atol=1e-14)
        assert got["intra"] == pytest.approx(one.intra, rel=1e-12)
        assert got["inter"] == pytest.approx(one.inter, rel=1e-12)
        assert got["counts"].tolist() == one.counts.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y = _uneven_data(16)
    cpu = angle_stats(x, y)
    gpu = angle_stats(x.cuda(), y.cuda())
    assert gpu.centers.device.type == "cuda"
    assert gpu.intra == pytest.approx(cpu.intra, rel=1e-10)
    assert gpu.inter == pytest.approx(cpu.inter, rel=1e-10)
    acc = AngleAccumulator(5, device="cuda")
    acc.update(x, y)
    torch.testing.assert_close(acc.centers().cpu(), cpu.centers)


# ----------------------------------------------------------------------------------- feature extraction
class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)
        self.aux = nn.Identity()

    def forward(self, x):
        return self.head(self.body(x))


def test_extract_features_captures_classifier_input_and_restores_modes():
    torch.manual_seed(0)
    net = _TinyNet()
    net.train()
    net.body[1].eval()  # mixed modes must come back exactly
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    feats, labels = extract_features(net, loader)
    net_eval = _TinyNet()
    net_eval.load_state_dict(net.state_dict())
    net_eval.eval()
    with torch.no_grad():
        expected = net_eval.body(x)
    torch.testing.assert_close(feats, expected)
    assert torch.equal(labels, y)
    assert net.training and not net.body[1].training and net.body[3].training and net.head.training
    feats2, _ = extract_features(net, loader, layer="body.1", max_batches=2)
    assert feats2.shape == (12, 8)
    with torch.no_grad():
        torch.testing.assert_close(feats2, net_eval.body[0](x[:12]))
    with pytest.raises(ValueError, match="no module named 'nope'"):
        extract_features(net, loader, layer="nope")
    with pytest.raises(RuntimeError, match="'aux' was not called"):
        extract_features(net, loader, layer="aux")
    assert net.training and not net.body[1].training  # modes restored after an error too


def test_feature_hook_in_a_training_loop_and_removal():
    net = _TinyNet()
    x = torch.randn(4, 5, requires_grad=True)
    with FeatureHook(net) as hook:
        assert hook.layer_name == "head"
        out = net(x)
        out.sum().backward()  # the hook does not disturb autograd
        assert hook.features.shape == (4, 8) and not hook.features.requires_grad
    hook.features = None
    net(x)
    assert hook.features is None  # removed on exit
    with pytest.raises(ValueError, match="has no nn.Linear"):
        FeatureHook(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_extract_features_torchvision_resnet18_tiny_input():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=4)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    feats, labels = extract_features(model, DataLoader(TensorDataset(x, y), batch_size=4))
    model.eval()
    with torch.no_grad():
        trunk = nn.Sequential(*list(model.children())[:-1])
        expected = trunk(x).flatten(1)
    assert feats.shape == (6, 512)
    torch.testing.assert_close(feats, expected)
    assert torch.all(feats >= 0)  # after ReLU + average pooling
    stats = angle_stats(feats, labels)
    intra, inter, _ = brute_force(feats, labels)
    assert stats.intra == pytest.approx(intra, rel=1e-9) and stats.inter == pytest.approx(inter, rel=1e-9)


def test_extract_features_zoo_resnet20_matches_classifier_input():
    from l2bn.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4, norm_layer="l2bn")
    x, y = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 1])
    feats, labels = extract_features(model, DataLoader(TensorDataset(x, y), batch_size=2))
    assert feats.shape == (5, 64) and torch.equal(labels, y)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.fc(feats), model(x), rtol=1e-5, atol=1e-5)  # fc sees exactly these
