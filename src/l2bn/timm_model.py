"""timm models built with L2BN throughout (needs ``pip install timm``, the ``timm`` extra).

timm's ``norm_layer=`` is not a reliable way in: of 22 sampled models that take it, 8 silently keep plain
BatchNorm somewhere (efficientformerv2, efficientvit_b, dpn, …) and 8 refuse the keyword (convmixer, dla,
efficientvim, efficientvit_m). :func:`create_timm_model` builds the model as timm defines it and converts it.
"""
from __future__ import annotations

import warnings
from typing import Any

import timm
import torch.nn as nn

from .convert import convert_to_l2bn, unconverted_batchnorms

__all__ = ["create_timm_model"]


def create_timm_model(model_name: str, *, rescale: bool = True, l2_eps: float = 1e-12, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)`` with every BatchNorm-family layer converted to L2BN.

    Unlike ``norm_layer=`` (which some timm models ignore, keeping plain BatchNorm, and others refuse), this
    builds the model as timm defines it and converts it with :func:`l2bn.convert_to_l2bn`; it ends with a fully
    converted model or ONE warning naming each layer that stayed as it was. Blocks that fold their norms for
    inference (RepVGG, MobileOne, …) then refuse ``timm.utils.reparameterize_model`` with an error saying why.

    Example::

        >>> model = create_timm_model("resnet18", num_classes=10)
        >>> type(model.bn1).__name__
        'L2BatchNorm2d'
    """
    model = timm.create_model(model_name, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reported once below, with the model's name
        model = convert_to_l2bn(model, rescale=rescale, l2_eps=l2_eps)
    left = unconverted_batchnorms(model)
    if left:
        warnings.warn(
            f"create_timm_model({model_name!r}) left {len(left)} BatchNorm-like layer(s) as they were: {', '.join(left)}",
            stacklevel=2,
        )
    return model
