"""Model zoo: parameter counts (closed forms and published figures), shapes, every norm in every family,
placement, initialisation, ImageNet builders without downloads."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import l2bn.models as M
from l2bn import L2BatchNorm2d
from l2bn.models import NormRecorder, cifar
from l2bn.norms import create_norm, get_norm_layer, list_norms

CIFAR_MODELS = [
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "densenet40_12", "densenet_bc100_12",
    "vgg16_bn", "vgg19_bn", "resnext29_8x64d", "regnetx_200mf", "regnety_400mf",
]
IMAGENET_MODELS = ["resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x4d"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These models are tiny: one intra-op thread avoids oversubscribing a shared CPU (100× faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]


# ---------------------------------------------------------------- registry and errors
def test_list_models_names_and_kinds():
    assert set(M.list_models()) == set(CIFAR_MODELS) | set(IMAGENET_MODELS) | {"asc_resnet17", "fcnn", "fsfcnn"}
    assert M.list_models("cifar") == sorted(CIFAR_MODELS)
    assert M.list_models("imagenet") == sorted(IMAGENET_MODELS)
    with pytest.raises(ValueError, match="kind"):
        M.list_models("mnist")


def test_errors_name_the_bad_value_and_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'resnet21'.*resnet20"):
        M.create_model("resnet21", num_classes=10)
    with pytest.raises(ValueError, match=r"'l3bn'.*l2bn"):
        M.create_model("resnet20", num_classes=10, norm_layer="l3bn")
    with pytest.raises(ValueError, match=r"'stage4'.*stage1.*classifier"):
        M.create_model("resnet20", num_classes=10, placement="stage4")
    with pytest.raises(ValueError, match=r"'stage3-1'"):
        M.create_model("resnet20", num_classes=10, placement="stage3-1")
    with pytest.raises(ValueError, match="num_classes"):
        M.create_model("resnet20", num_classes=0)
    with pytest.raises(ValueError, match="shortcut"):
        M.create_model("resnet20", num_classes=10, shortcut="C")
    with pytest.raises(ValueError, match="depth 41"):
        cifar.DenseNet(41, 12)
    with pytest.raises(TypeError):
        M.create_model("resnet50", num_classes=1000, weights="DEFAULT")


# ---------------------------------------------------------------- parameter counts
def resnet_closed_form(n: int, in_ch: int, classes: int, shortcut: str) -> int:
    total, w_in = 9 * in_ch * 16 + 2 * 16, 16
    for w in (16, 32, 64):
        for b in range(n):
            total += 9 * w_in * w + 9 * w * w + 4 * w
            if b == 0 and w != w_in and shortcut == "B":
                total += w_in * w + 2 * w
            w_in = w
    return total + 64 * classes + classes


def densenet_closed_form(depth: int, k: int, bc: bool, classes: int) -> int:
    per_block = (depth - 4) // (6 if bc else 3)
    c = 2 * k if bc else 16
    total = 9 * 3 * c
    for block in range(3):
        for _ in range(per_block):
            total += 2 * c + (c * 4 * k + 2 * 4 * k + 9 * 4 * k * k if bc else 9 * c * k)
            c += k
        if block < 2:
            out = c // 2 if bc else c
            total += 2 * c + c * out
            c = out
    return total + 2 * c + c * classes + classes


def resnext29_closed_form(card: int, d: int, classes: int) -> int:
    total, c_in = 9 * 3 * 64 + 2 * 64, 64
    for stage, out in enumerate((256, 512, 1024)):
        width = card * d * 2**stage
        for b in range(3):
            total += c_in * width + 2 * width + 9 * width * width // card + 2 * width + width * out + 2 * out
            if b == 0:
                total += c_in * out + 2 * out
            c_in = out
    return total + 1024 * classes + classes


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_counts_match_closed_form(depth, shortcut):
    model = M.create_model(f"resnet{depth}", num_classes=100, in_channels=1, shortcut=shortcut)
    assert n_params(model) == resnet_closed_form((depth - 2) // 6, 1, 100, shortcut)


def test_densenet_resnext_vgg_counts_match_closed_form():
    assert n_params(M.create_model("densenet40_12", num_classes=10)) == densenet_closed_form(40, 12, False, 10)
    assert n_params(M.create_model("densenet_bc100_12", num_classes=100)) == densenet_closed_form(100, 12, True, 100)
    with torch.device("meta"):
        assert n_params(M.create_model("resnext29_8x64d", num_classes=10)) == resnext29_closed_form(8, 64, 10)
    for name, cfg in (("vgg16_bn", [2, 2, 3, 3, 3]), ("vgg19_bn", [2, 2, 4, 4, 4])):
        widths = [w for w, reps in zip((64, 128, 256, 512, 512), cfg) for _ in range(reps)]
        expected = sum(9 * a * b + 2 * b for a, b in zip([3] + widths[:-1], widths)) + 512 * 10 + 10
        assert n_params(M.create_model(name, num_classes=10)) == expected


PUBLISHED = {  # millions of parameters (CIFAR-10 head; ImageNet 1000 classes)
    "resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7,
    "densenet40_12": 1.0, "densenet_bc100_12": 0.8, "resnext29_8x64d": 34.4,
    "resnet50": 25.6, "resnet101": 44.5, "resnext50_32x4d": 25.0, "resnext101_32x4d": 44.2,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_match_published_figures(name):
    classes = 1000 if name in IMAGENET_MODELS else 10
    with torch.device("meta"):
        count = n_params(M.create_model(name, num_classes=classes))
    assert abs(count / 1e6 - PUBLISHED[name]) <= 0.05 * PUBLISHED[name], count


def test_imagenet_models_match_torchvision_structure():
    with torch.device("meta"):
        ours = M.create_model("resnext101_32x4d", num_classes=1000)
        wide = torchvision.models.resnext101_32x8d(weights=None)
        r50 = M.create_model("resnet50", num_classes=1000)
        ref50 = torchvision.models.resnet50(weights=None)
    assert list(ours.state_dict()) == list(wide.state_dict())  # same layout, half the group width
    assert ours.layer1[0].conv2.out_channels == 32 * 4 and ours.layer1[0].conv2.groups == 32
    assert {k: v.shape for k, v in r50.state_dict().items()} == {k: v.shape for k, v in ref50.state_dict().items()}


# ---------------------------------------------------------------- shapes and small inputs
@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_models_accept_small_grayscale_inputs(name):
    model = M.create_model(name, num_classes=7, in_channels=1, norm_layer="l2bn").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert not bn_names(model)


@pytest.mark.parametrize("name", ["resnet20", "densenet40_12", "vgg16_bn", "regnetx_200mf"])
def test_cifar_models_on_28_and_32_pixels(name):
    model = M.create_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_forward_features_is_the_classifier_input():
    for name in ("resnet20", "densenet40_12", "vgg16_bn"):
        model = M.create_model(name, num_classes=10).eval()
        seen = []
        model.fc.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            logits = model(x)
            feats = model.forward_features(x)
        torch.testing.assert_close(feats, seen[0])
        torch.testing.assert_close(logits, feats @ model.fc.weight.T + model.fc.bias)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    out = cifar.PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], x[:, :, 0::2, 0::2], rtol=0, atol=0)
    assert (out[:, 16:] == 0).all()
    model = M.create_model("resnet20", num_classes=10)
    assert isinstance(model.layer2[0].downsample, cifar.PadShortcut) and model.layer1[0].downsample is None
    model_b = M.create_model("resnet20", num_classes=10, shortcut="B")
    assert isinstance(model_b.layer3[0].downsample[0], nn.Conv2d)


def test_regnet_configurations():
    x = M.create_model("regnetx_200mf", num_classes=10)
    y = M.create_model("regnety_400mf", num_classes=10)
    depths_x = [len(s) for s in x.trunk_output.children()]
    depths_y = [len(s) for s in y.trunk_output.children()]
    assert depths_x == [1, 1, 4, 7] and depths_y == [1, 3, 6, 6]
    assert x.fc.in_features == 368 and y.fc.in_features == 440
    se = [m for m in y.modules() if isinstance(m, torchvision.ops.SqueezeExcitation)]
    assert len(se) == 16 and not any(isinstance(m, torchvision.ops.SqueezeExcitation) for m in x.modules())
    assert se[0].fc1.out_channels == round(0.25 * 64)  # ratio of the block input (stem) width
    convs = [m for m in x.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups > 1]
    assert all(m.in_channels // m.groups == 8 for m in convs)  # group width 8
    with torch.no_grad():
        feats = x.trunk_output(x.stem(torch.randn(1, 3, 32, 32)))
    assert feats.shape[-2:] == (8, 8)  # strides 1, 1, 2, 2 after a stride-1 stem


# ---------------------------------------------------------------- every norm, one training step
TINY = {  # the smallest member of each family (same code, narrower), input size
    "resnet20": (lambda **k: M.create_model("resnet20", in_channels=1, **k), 1, 8),
    "resnext29": (lambda **k: cifar.resnext29(2, 32, planes=(8, 16, 32), stem_width=16, **k), 3, 8),
    "densenet": (lambda **k: cifar.DenseNet(7, 8, **k), 3, 8),
    "densenet_bc": (lambda **k: cifar.DenseNet(16, 16, bottleneck=True, compression=0.5, **k), 3, 8),
    "vgg": (lambda **k: cifar.CifarVGG(((8,), (8,), (16,), (16,), (16,)), **k), 3, 32),
    "regnet": (
        lambda **k: cifar.cifar_regnet(
            dict(depths=(1, 1, 1, 1), widths=(8, 16, 16, 32), group_width=8, bottleneck=1.0, se=0.25),
            stem_width=8, **k),
        3, 8),
}


def norm_channels(build) -> list[int]:
    recorder = NormRecorder(nn.BatchNorm2d)
    build(num_classes=10, norm_layer=recorder)
    return [c for _, c in recorder.created]


def expected_construction_error(norm: str, channels: list[int]) -> bool:
    match = re.fullmatch(r"gn-cpg(\d+)", norm)
    return bool(match) and any(c % int(match[1]) for c in channels)


def one_training_step(build, norm: str, in_ch: int, size: int) -> None:
    torch.manual_seed(0)
    channels = norm_channels(build)
    if expected_construction_error(norm, channels):
        with pytest.raises(ValueError, match="divisible"):
            build(num_classes=10, norm_layer=norm)
        return
    recorder = NormRecorder(get_norm_layer(norm))
    model = build(num_classes=10, norm_layer=recorder)
    assert sorted(c for _, c in recorder.created) == sorted(channels)  # every position, right width
    norm_type = type(create_norm(norm, 8))
    norms = [(n, m) for n, m in model.named_modules() if type(m) is norm_type]
    assert {id(m) for _, m in norms} == {id(m) for m in recorder.modules}
    if norm != "bn":  # no plain BatchNorm outside the requested norm's own sub-modules
        names = [n for n, _ in norms]
        assert not [b for b in bn_names(model) if not any(b.startswith(n + ".") for n in names)]
    x, y = torch.randn(4, in_ch, size, size), torch.tensor([0, 1, 2, 3])
    before = model.fc.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    assert not torch.equal(before, model.fc.weight)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize("norm", list_norms())
@pytest.mark.parametrize("family", sorted(TINY))
def test_every_norm_in_every_family_trains_one_step(family, norm):
    build, in_ch, size = TINY[family]
    one_training_step(build, norm, in_ch, size)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_every_registered_cifar_model_trains_one_l2bn_step_on_small_inputs(name):
    """The real models (not the tiny copies above): a train-mode L2BN step on 8×8 digits-sized input,
    then 28×28 Fashion-MNIST-sized inference."""
    one_training_step(lambda **k: M.create_model(name, in_channels=1, **k), "l2bn", 1, 8)
    model = M.create_model(name, num_classes=10, in_channels=1, norm_layer="l2bn")
    with torch.no_grad():
        model(torch.randn(4, 1, 28, 28))  # fill the running statistics once
        out = model.eval()(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("norm", list_norms())
@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_every_norm_in_every_cifar_model_trains_one_step(name, norm):
    one_training_step(lambda **k: M.create_model(name, **k), norm, 3, 32)


# ---------------------------------------------------------------- placement
RESNET_PLACEMENTS = {
    "all": r".*",
    "none": r"(?!)",
    "stem": r"bn1$",
    "stage1": r"layer1\.",
    "stage2": r"layer2\.",
    "stage3": r"layer3\.",
    "stage1-2": r"layer[12]\.",
    "stage2-3": r"layer[23]\.",
    "classifier": r"layer3\.2\.bn2$",
    "stage1+classifier": r"layer1\.|layer3\.2\.bn2$",
}


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("placement", sorted(RESNET_PLACEMENTS))
def test_resnet_placement_touches_exactly_the_intended_layers(placement, shortcut):
    reference = M.create_model("resnet20", num_classes=10, shortcut=shortcut)
    model = M.create_model("resnet20", num_classes=10, shortcut=shortcut, norm_layer="l2bn", placement=placement)
    positions = bn_names(reference)
    expected = {n for n in positions if re.match(RESNET_PLACEMENTS[placement], n)}
    got = {n for n, m in model.named_modules() if isinstance(m, L2BatchNorm2d)}
    assert got == expected
    assert set(bn_names(model)) == set(positions) - expected
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # same channels everywhere
    if placement == "stage2-3" and shortcut == "B":
        assert "layer2.0.downsample.1" in got
    loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", CIFAR_MODELS + IMAGENET_MODELS)
def test_classifier_placement_is_the_last_norm_before_the_head(name):
    classes = 1000 if name in IMAGENET_MODELS else 10
    with torch.device("meta"):
        reference = M.create_model(name, num_classes=classes)
        model = M.create_model(name, num_classes=classes, norm_layer="ln", placement="classifier")
    ln = type(create_norm("ln", 8))
    assert [n for n, m in model.named_modules() if isinstance(m, ln)] == [bn_names(reference)[-1]]
    assert len(bn_names(model)) == len(bn_names(reference)) - 1


def test_stage_placements_of_other_families():
    dense = M.create_model("densenet40_12", num_classes=10, norm_layer="l2bn", placement="stage2")
    got = {n for n, m in dense.named_modules() if isinstance(m, L2BatchNorm2d)}
    assert got and all(re.match(r"(block2|trans2)\.", n) for n in got)
    assert len(got) == 12 + 1  # twelve layers and one transition
    vgg = M.create_model("vgg16_bn", num_classes=10, norm_layer="l2bn", placement="stage2-4")
    got = [n for n, m in vgg.named_modules() if isinstance(m, L2BatchNorm2d)]
    assert len(got) == 2 + 3 + 3 and all(re.match(r"stage[234]\.", n) for n in got)
    reg = M.create_model("regnety_400mf", num_classes=10, norm_layer="l2bn", placement="stem+stage4")
    got = [n for n, m in reg.named_modules() if isinstance(m, L2BatchNorm2d)]
    assert got[0] == "stem.1" and len(got) == 1 + 6 * 3 + 1  # 6 blocks of 3 norms, one projection
    with torch.device("meta"):
        r50 = M.create_model("resnet50", num_classes=1000, norm_layer="l2bn", placement="stage4")
    got = [n for n, m in r50.named_modules() if isinstance(m, L2BatchNorm2d)]
    assert len(got) == 3 * 3 + 1 and all(n.startswith("layer4.") for n in got)


def test_placement_with_another_base_norm():
    model = M.create_model("resnet20", num_classes=10, norm_layer="l2bn", placement="stage1", base_norm_layer="ln")
    ln = type(create_norm("ln", 8))
    assert all(isinstance(m, L2BatchNorm2d) for n, m in model.named_modules() if n.startswith("layer1.") and
               n.endswith(("bn1", "bn2")))
    assert isinstance(model.bn1, ln) and isinstance(model.layer3[2].bn2, ln)
    assert not bn_names(model)


# ---------------------------------------------------------------- initialisation
class OddNorm(nn.Module):
    """A norm whose constructor leaves junk in its affine parameters; only reset_parameters() fixes them."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_features,), 3.0))
        self.bias = nn.Parameter(torch.full((num_features,), 7.0))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        return F.group_norm(x, 1, self.weight, self.bias)


class NoResetNorm(OddNorm):
    reset_parameters = None  # type: ignore[assignment]


@pytest.mark.parametrize("norm_cls", [OddNorm, NoResetNorm])
@pytest.mark.parametrize("family", sorted(TINY))
def test_non_batchnorm_layers_are_reset(family, norm_cls):
    build, _, _ = TINY[family]
    model = build(num_classes=10, norm_layer=norm_cls)
    norms = [m for m in model.modules() if isinstance(m, OddNorm)]
    assert len(norms) == len(norm_channels(build))
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)


def test_placed_and_imagenet_norms_are_reset():
    model = M.create_model("resnet20", num_classes=10, norm_layer=OddNorm, placement="stage2")
    norms = [m for m in model.modules() if isinstance(m, OddNorm)]
    assert len(norms) == 6 and all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)
    r50 = M.create_model("resnet50", num_classes=10, norm_layer=NoResetNorm, zero_init_residual=True)
    norms = {n: m for n, m in r50.named_modules() if isinstance(m, OddNorm)}
    assert len(norms) == 53
    assert all((m.weight == (0 if n.endswith("bn3") else 1)).all() and (m.bias == 0).all() for n, m in norms.items())


def test_convolutions_get_kaiming_fan_out_init():
    torch.manual_seed(0)
    vgg = M.create_model("vgg16_bn", num_classes=10)
    conv = vgg.stage5[0]
    std = math.sqrt(2.0 / (conv.out_channels * 9))
    assert abs(conv.weight.std().item() / std - 1) < 0.01 and abs(conv.weight.mean().item()) < 0.01 * std
    reg = M.create_model("regnety_400mf", num_classes=10)
    se_conv = next(m for m in reg.modules() if isinstance(m, torchvision.ops.SqueezeExcitation)).fc1
    assert (se_conv.bias == 0).all()
    wide = reg.trunk_output.block4[0].f.a[0]
    assert abs(wide.weight.std().item() / math.sqrt(2.0 / wide.out_channels) - 1) < 0.02


# ---------------------------------------------------------------- ImageNet
def test_imagenet_builders_never_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse, raising=False)
    torch.manual_seed(0)
    model = M.create_model("resnet50", num_classes=7, in_channels=1, norm_layer="l2bn")
    assert not bn_names(model) and model.conv1.in_channels == 1
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_l2bn_checkpoints_load_into_bn_models():
    bn = M.create_model("resnet20", num_classes=10)
    l2 = M.create_model("resnet20", num_classes=10, norm_layer="l2bn")
    l2.load_state_dict(bn.state_dict())
    bn.load_state_dict(l2.state_dict())


# ---------------------------------------------------------------- command line
def test_models_command_lists_and_shows_layout(capsys):
    from l2bn.cli import main

    assert main(["models"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == len(M.list_models())
    assert any(line.split()[:3] == ["resnet20", "cifar", "0.27M"] for line in listing)
    assert main(["models", "resnet20", "--norm", "l2bn", "--placement", "classifier"]) == 0
    layout = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert len(layout) == 19 and layout[-1] == ["layer3.2.bn2", "L2BatchNorm2d(64)"]
    assert all(kind.startswith("BatchNorm2d(") for _, kind in layout[:-1])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["models", "resnet21"], r"unknown model 'resnet21'; known models: .*resnet20"),
        (["models", "resnet20", "--norm", "l3bn"], r"unknown norm 'l3bn'.*l2bn"),
        (["models", "densenet40_12", "--placement", "stem"], r"unknown placement 'stem'.*stage1, stage2, stage3"),
        (["models", "densenet_bc100_12", "--norm", "gn-cpg8"], r"num_features=\d+ is not divisible"),
    ],
)
def test_models_command_reports_bad_input_in_one_line(argv, message, capsys):
    from l2bn.cli import main

    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0])
