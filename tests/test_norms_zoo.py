"""The zoo as a whole: registry, constructor contract, input ranks, BIN helpers, training inside a ResNet."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

from l2bn.norms import (
    BatchInstanceNorm,
    clip_gates_,
    create_norm,
    gate_parameters,
    get_norm_layer,
    list_norms,
    param_groups,
)

ZOO = ["bn", "l2bn", "ln", "in", "gn-cpg4", "gn-cpg8", "sn", "bcn", "bin", "pn", "lnbn", "inbn", "pnbn", "ubn"]
RANK_AGNOSTIC = [n for n in ZOO if n not in ("bn", "l2bn", "ubn")]  # bn/l2bn/ubn are the 2-d classes
NEED_POSITIONS = {"in", "sn", "bin", "inbn"}  # instance statistics are undefined for (N, C)


pytestmark = pytest.mark.usefixtures("seeded")


def test_every_name_is_registered_case_insensitively():
    assert set(ZOO) <= set(list_norms())
    for name in ZOO:
        assert type(create_norm(name.upper(), 8)) is type(create_norm(name, 8))


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as info:
        get_norm_layer("batchnorm")
    message = str(info.value)
    assert "'batchnorm'" in message
    for name in ZOO:
        assert name in message


@pytest.mark.parametrize("name", ZOO)
def test_device_dtype_and_reset_parameters(name):
    torch.manual_seed(1)  # layers with a random init (UBN's convolution) draw it again on reset
    m = create_norm(name, 8, device="cpu", dtype=torch.float64)
    tensors = list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]
    assert tensors and all(t.dtype == torch.float64 and t.device.type == "cpu" for t in tensors)
    fresh = copy.deepcopy(m.state_dict())
    m.train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    m(torch.randn(4, 8, 3, 3, dtype=torch.float64) * 3 + 1)  # moves running statistics where there are any
    torch.manual_seed(1)
    m.reset_parameters()
    for key, value in m.state_dict().items():
        torch.testing.assert_close(value, fresh[key], msg=f"{name}: {key} not restored by reset_parameters")


@pytest.mark.parametrize("name", ZOO)
def test_device_and_dtype_reach_every_tensor_and_forward(name):
    """``device``/``dtype`` land on every parameter and buffer (meta: a device other than the default)."""
    m = create_norm(name, 8, device="meta", dtype=torch.float16)
    tensors = dict(m.named_parameters()) | dict(m.named_buffers())
    for key, t in tensors.items():
        assert t.device.type == "meta", f"{name}: {key} on {t.device}"
        assert not t.is_floating_point() or t.dtype == torch.float16, f"{name}: {key} is {t.dtype}"
    y = m(torch.empty(4, 8, 3, 3, device="meta", dtype=torch.float16))
    assert y.shape == (4, 8, 3, 3) and y.device.type == "meta" and y.dtype == torch.float16


@pytest.mark.parametrize("name", ZOO)
def test_train_and_eval_modes_give_finite_outputs(name):
    m = create_norm(name, 8)
    x = torch.randn(4, 8, 5, 5)
    y_train = m(x)
    m.eval()
    y_eval = m(x)
    assert y_train.shape == y_eval.shape == x.shape
    assert torch.isfinite(y_train).all() and torch.isfinite(y_eval).all()


@pytest.mark.parametrize("name", RANK_AGNOSTIC)
def test_one_dimensional_inputs(name):
    m = create_norm(name, 8)
    y = m(torch.randn(4, 8, 6))
    assert y.shape == (4, 8, 6) and torch.isfinite(y).all()
    vectors = torch.randn(6, 8)
    if name in NEED_POSITIONS:
        with pytest.raises(ValueError, match="at least one spatial dim"):
            m(vectors)
    else:
        y = m(vectors)
        assert y.shape == (6, 8) and torch.isfinite(y).all()


# ---------------------------------------------------------------- BIN helpers


def bin_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchInstanceNorm(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                         BatchInstanceNorm(2))


def test_param_groups_give_gates_ten_times_lr_and_no_decay():
    net = bin_net()
    groups = param_groups(net, lr=0.1, weight_decay=5e-4)
    gates = {id(p) for p in gate_parameters(net)}
    assert len(gates) == 2
    by_kind = {bool(ids & gates): g for g in groups for ids in [{id(p) for p in g["params"]}]}
    assert {id(p) for p in by_kind[True]["params"]} == gates
    assert by_kind[True]["lr"] == pytest.approx(1.0) and by_kind[True]["weight_decay"] == 0.0
    assert by_kind[False]["lr"] == 0.1 and by_kind[False]["weight_decay"] == 5e-4
    assert not {id(p) for p in by_kind[False]["params"]} & gates
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    plain = param_groups(nn.Linear(2, 2), lr=0.1, weight_decay=0.0)
    assert len(plain) == 1 and len(plain[0]["params"]) == 2


def test_clip_gates_after_optimizer_step():
    net = bin_net()
    optimizer = torch.optim.SGD(param_groups(net, lr=1.0, weight_decay=1e-2), lr=1.0)
    x = torch.randn(4, 3, 5, 5)
    for sign in (-1.0, 1.0):  # push gates above 1, then below 0
        optimizer.zero_grad()
        (sign * net(x).mean() + sign * sum(g.sum() for g in gate_parameters(net)) * 10).backward()
        optimizer.step()
        gates = torch.cat([g.detach() for g in gate_parameters(net)])
        assert (gates > 1).any() if sign < 0 else (gates < 0).any()
        clip_gates_(net)
        gates = torch.cat([g.detach() for g in gate_parameters(net)])
        assert gates.min() >= 0 and gates.max() <= 1
        assert torch.equal(gates, torch.ones_like(gates) if sign < 0 else torch.zeros_like(gates))


def test_trainer_uses_gate_groups_and_clips_gates(tmp_path, monkeypatch):
    """``l2bn.train`` builds BIN's param groups and clips the gates after every step (control: no clipping)."""
    from l2bn.data import build_data
    from l2bn.train import engine
    from l2bn.train.recipes import get_recipe

    data = build_data("digits")

    def tiny(num_classes: int, in_channels: int, norm: str) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), get_norm_layer(norm)(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))

    def run(name: str) -> dict:
        recipe = get_recipe("digits-quick", epochs=1, batch_size=64, lr=0.1, weight_decay=5e-4, metrics_every=5)
        config = engine.TrainConfig(out=str(tmp_path / name), norm="bin", recipe=recipe, progress=False)
        engine.train(config, model_fn=tiny, data=data, log=lambda msg: None)
        return torch.load(tmp_path / name / "last.pt", weights_only=False)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is many times faster on a shared CPU
    try:
        ckpt = run("clipped")
        monkeypatch.setattr(engine, "gate_clipper", lambda model: (lambda: None))
        unclipped = run("unclipped")["model"]["1.gate"]
    finally:
        torch.set_num_threads(threads)
    gate = ckpt["model"]["1.gate"]
    assert gate.min() >= 0 and gate.max() <= 1 and (gate == 1).any() and (gate < 1).any()
    groups = ckpt["optimizer"]["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (pytest.approx(0.1), 5e-4, 5), (pytest.approx(1.0), 0.0, 1)
    ]
    assert unclipped.max() > 1, "control run: without clipping some gate should leave [0, 1]"


# ---------------------------------------------------------------- inside a ResNet


class TinyResNet(nn.Module):
    """Stem + two torchvision BasicBlocks (one downsampling) + linear head; ``norm_layer`` as torchvision's."""

    def __init__(self, norm_layer, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), norm_layer(16), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), norm_layer(32))
        self.blocks = nn.Sequential(
            BasicBlock(16, 16, norm_layer=norm_layer), BasicBlock(16, 32, stride=2, downsample=down, norm_layer=norm_layer)
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("name", ZOO)
def test_every_norm_trains_inside_a_resnet(name):
    net = TinyResNet(get_norm_layer(name))
    x = torch.randn(8, 3, 8, 8)
    y = torch.arange(8) % 3
    optimizer = torch.optim.SGD(param_groups(net, lr=0.05, weight_decay=1e-4), momentum=0.9)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        clip_gates_(net)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], f"{name}: loss did not decrease: {losses}"
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()


@pytest.mark.needs_batchnorm_bias
def test_ablation_layers_take_batchnorms_bias_keyword():
    from l2bn.norms import INBatchNorm, LNBatchNorm, PNBatchNorm

    for cls in (LNBatchNorm, INBatchNorm, PNBatchNorm):
        layer = cls(4, bias=False)
        assert layer.bias is None and layer.weight is not None
        assert set(layer.state_dict()) == set(torch.nn.BatchNorm2d(4, bias=False).state_dict())
        assert layer(torch.randn(3, 4, 5, 5)).shape == (3, 4, 5, 5)


def test_switchable_norm_builds_on_norm_base():
    from torch.nn.modules.batchnorm import _NormBase

    from l2bn.norms import SwitchableNorm

    layer = SwitchableNorm(6)
    assert isinstance(layer, _NormBase)
    assert set(layer.state_dict()) == set(torch.nn.BatchNorm2d(6).state_dict()) | {"mean_weight", "var_weight"}
    layer(torch.randn(4, 6, 3, 3))
    layer.reset_parameters()
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.mean_weight, torch.ones(3))
    assert not SwitchableNorm(6, using_bn=False).track_running_stats
