"""Every timm model with BatchNorm-family layers up to 50M parameters, converted to L2BN (tests/model_sweep.py
says what is checked). The full sweep is ``slow``; a few models run in the default suite."""
from __future__ import annotations

import functools

import pytest
import torch

timm = pytest.importorskip("timm", reason="needs the timm extra")

from model_sweep import check_image_model, skip_unless_swept  # noqa: E402

FAST_SAMPLE = ["mobilenetv3_small_050", "regnetx_002", "repvgg_a0", "efficientvit_m0"]
SIZE = 64  # input side, unless the model fixes its input size or sets a larger minimum (then that one)


def _build(name: str) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0)


def _side(model: torch.nn.Module) -> int:
    """SIZE, the size a fixed-input model was defined for, or the model's minimum input size where it is larger
    (bat_resnext26ts: 256, its attention blocks tile the last feature map)."""
    config = getattr(model, "pretrained_cfg", None) or {}
    if config.get("fixed_input_size"):
        return config["input_size"][-1]
    return max(SIZE, config.get("min_input_size", (SIZE,))[-1])


def sweep(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_swept(functools.partial(_build, name))
    torch.manual_seed(0)
    model = _build(name)
    side = _side(model)
    check_image_model(model, side, monkeypatch)


@pytest.mark.parametrize("name", FAST_SAMPLE)
def test_timm_sample(name, monkeypatch):
    sweep(name, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", timm.list_models())
def test_timm_sweep(name, monkeypatch):
    sweep(name, monkeypatch)
