"""CIFAR-sized networks (32×32 input; 8×8 and 28×28 inputs work too), one file a family."""
from .densenet import DenseNet, densenet40_12, densenet_bc100_12, densenet_parts
from .regnet import cifar_regnet, regnet_parts, regnetx_200mf, regnety_400mf
from .resnet import CifarResNet, PadShortcut, cifar_resnet_parts, resnet20, resnet32, resnet44, resnet56, resnet110
from .resnext import resnext29, resnext29_8x64d
from .vgg import CifarVGG, vgg16_bn, vgg19_bn, vgg_parts

__all__ = [
    "CifarResNet",
    "CifarVGG",
    "DenseNet",
    "PadShortcut",
    "cifar_regnet",
    "cifar_resnet_parts",
    "densenet40_12",
    "densenet_bc100_12",
    "densenet_parts",
    "regnet_parts",
    "regnetx_200mf",
    "regnety_400mf",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnext29",
    "resnext29_8x64d",
    "vgg16_bn",
    "vgg19_bn",
    "vgg_parts",
]
