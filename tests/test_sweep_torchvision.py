"""Every torchvision classification, detection and segmentation builder with BatchNorm-family layers, converted
to L2BN (tests/model_sweep.py says what is checked; detection models train on targets). The full sweep is
``slow``; a few builders run in the default suite."""
from __future__ import annotations

import functools

import pytest
import torch
import torchvision.models as tvm

from model_sweep import check_image_model, check_model, skip_unless_swept

FAST_SAMPLE = ["mobilenet_v3_small", "lraspp_mobilenet_v3_large"]  # detection: slow sweep only (15-50 s each here)
MAX_PARAMS = 150_000_000  # regnet_y_128gf (645M) would need ~10 GB on the shared test machine
DETECTION = tvm.list_models(module=tvm.detection)
SEGMENTATION = tvm.list_models(module=tvm.segmentation)
ALL = tvm.list_models(module=tvm) + DETECTION + SEGMENTATION
SIDE = 64
DETECTION_SIDE = 128


def _build(name: str) -> torch.nn.Module:
    if name in DETECTION:
        size = {} if name.startswith("ssd") else {"min_size": DETECTION_SIDE, "max_size": DETECTION_SIDE}
        return tvm.get_model(name, weights=None, weights_backbone=None, **size)
    if name in SEGMENTATION:
        return tvm.get_model(name, weights=None, weights_backbone=None)
    return tvm.get_model(name, weights=None)


def _side(name: str) -> int:
    """SIDE, or the smallest input a classifier takes (the ViTs: 224; inception_v3's auxiliary head, which runs
    in training, needs 299)."""
    if name == "inception_v3":
        return 299
    weights = list(tvm.get_model_weights(name))
    return max(SIDE, *weights[0].meta.get("min_size", (SIDE, SIDE)))


def _detection_target(side: int, label: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    mask = torch.zeros(1, side, side, dtype=torch.uint8)
    mask[:, 20:90, 10:60] = 1
    # float32 whatever the model's dtype: keypoint R-CNN's roi_heads accept no other
    keypoints = torch.tensor([[[10.0 + 2 * k, 20.0 + 3 * k, 1.0] for k in range(17)]])
    return {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]], dtype=dtype), "labels": torch.tensor([label]),
            "masks": mask, "keypoints": keypoints}


def _detection_forward(model: torch.nn.Module, dtype: torch.dtype) -> object:
    x = torch.rand(2, 3, DETECTION_SIDE, DETECTION_SIDE, generator=torch.Generator().manual_seed(1), dtype=dtype)
    images = list(x)
    if model.training:
        keypoints = getattr(getattr(model, "roi_heads", None), "keypoint_head", None) is not None
        labels = (1, 1) if keypoints else (1, 2)  # keypoint R-CNN has one class (person) and the background
        return model(images, [_detection_target(DETECTION_SIDE, label, dtype) for label in labels])
    return model(images)


def sweep(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_swept(functools.partial(_build, name), MAX_PARAMS)
    torch.manual_seed(0)
    model = _build(name)
    if name in DETECTION:
        check_model(model, _detection_forward, lambda losses: sum(losses.values()), monkeypatch)
        return
    side = SIDE if name in SEGMENTATION else _side(name)
    check_image_model(model, side, monkeypatch)


@pytest.mark.parametrize("name", FAST_SAMPLE)
def test_torchvision_sample(name, monkeypatch):
    sweep(name, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_torchvision_sweep(name, monkeypatch):
    sweep(name, monkeypatch)
