"""The paper's networks with any norm in any place: ``create_model(name, num_classes=..., norm_layer=...)``.

CIFAR (Table 1): resnet20/32/44/56/110, densenet40_12, densenet_bc100_12, vgg16_bn, vgg19_bn,
resnext29_8x64d, regnetx_200mf, regnety_400mf. ImageNet (Table 2): resnet50, resnet101, resnext50_32x4d,
resnext101_32x4d. Acoustic scenes (Table 6): asc_resnet17, fcnn, fsfcnn. See docs/models.md for configurations and placements (Table 4).
"""
from . import asc, cifar, imagenet
from ._utils import NormRecorder, init_weights, replace_norms, reset_norm
from .registry import ModelEntry, create_model, get_model_entry, list_models, register_model, resolve_placement

for _name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110"):
    register_model(_name, getattr(cifar, _name), cifar.cifar_resnet_parts, "cifar", family="resnet")
register_model("resnext29_8x64d", cifar.resnext29_8x64d, cifar.cifar_resnet_parts, "cifar", family="resnext")
for _name in ("densenet40_12", "densenet_bc100_12"):
    register_model(_name, getattr(cifar, _name), cifar.densenet_parts, "cifar", family="densenet")
for _name in ("vgg16_bn", "vgg19_bn"):
    register_model(_name, getattr(cifar, _name), cifar.vgg_parts, "cifar", family="vgg")
for _name in ("regnetx_200mf", "regnety_400mf"):
    register_model(_name, getattr(cifar, _name), cifar.regnet_parts, "cifar", family="regnet")
for _name in imagenet.IMAGENET_CONFIGS:
    _family = "resnext" if _name.startswith("resnext") else "resnet"
    register_model(_name, getattr(imagenet, _name), imagenet.imagenet_resnet_parts, "imagenet", family=_family)
for _name, _family in (("asc_resnet17", "asc-resnet"), ("fcnn", "fcnn"), ("fsfcnn", "fcnn")):
    register_model(_name, getattr(asc, _name), asc.asc_parts, "asc", family=_family)

__all__ = [
    "ModelEntry",
    "NormRecorder",
    "create_model",
    "get_model_entry",
    "init_weights",
    "list_models",
    "register_model",
    "replace_norms",
    "reset_norm",
    "resolve_placement",
]
