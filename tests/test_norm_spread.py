"""NormSpread: the CV of the per-sample input norms at every normalization layer, against a float64 formula."""
import pytest
import torch
import torch.nn as nn

from l2bn import L2BatchNorm2d
from l2bn.models import create_model
from l2bn.norm_spread import NormSpread, normalization_layers


def _cv64(x: torch.Tensor) -> float:
    n = x.double().flatten(1).pow(2).sum(1).sqrt()
    return float(n.std(unbiased=True) / n.mean())


def test_cv_of_the_input_norms_averaged_over_training_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), L2BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4))
    spread = NormSpread(model)
    assert list(spread.layers) == ["1", "4"]
    batches = [torch.randn(6, 3, 5, 5) * torch.linspace(0.5, 3.0, 6).view(-1, 1, 1, 1) for _ in range(3)]
    expected = {"1": [], "4": []}
    with torch.no_grad():
        for x in batches:
            h = model[0](x)
            expected["1"].append(_cv64(h))
            expected["4"].append(_cv64(model[3](model[2](model[1](h)))))
        with spread:  # replay the same forwards with the hooks on
            for x in batches:
                model(x)
    got = spread.summary()
    for name, values in expected.items():
        assert got[name] == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert spread.summary() == {}  # a summary starts afresh
    model.eval()
    with spread:
        model(batches[0])
    assert spread.summary() == {}  # evaluation forwards are not counted
    model(batches[0])
    assert spread.summary() == {}  # outside the context no hook is left


@pytest.mark.parametrize("norm", ["bn", "l2bn", "gn-cpg4", "bcn", "ubn"])
def test_every_norm_layer_of_a_zoo_model_counts_once(norm):
    model = create_model("resnet20", num_classes=10, in_channels=1, norm_layer=norm)
    layers = normalization_layers(model)
    assert len(layers) == 19  # ResNet-20: the stem, 18 in the blocks (zoo layers built from BN count once)
    with NormSpread(model) as spread:
        model(torch.randn(4, 1, 28, 28))
    values = spread.summary()
    assert set(values) == set(layers) and all(v > 0 for v in values.values())
