"""``l2bn models``: list the model zoo, or show where a norm lands for one model and placement."""
from __future__ import annotations

import argparse

import torch

from ..models import create_model, get_model_entry, list_models


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``models`` sub-command."""
    parser = subparsers.add_parser(
        "models",
        help="list models (name, kind, parameters) or show the norm layout of one",
        description="Without NAME: every model with its parameter count. With NAME: the norm class of each "
        "norm position for --norm and --placement.",
    )
    parser.add_argument("name", nargs="?", help="a model name (see the list)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--norm", default="l2bn", help="norm registry name (default: l2bn)")
    parser.add_argument("--placement", default="all", help="all | none | classifier | stage1 | stage2-3 | ...")
    parser.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    """Print the model list or one model's norm layout (bad names raise ``ValueError``)."""
    if args.name is None:
        for name in list_models():
            kind = get_model_entry(name).kind
            classes = 1000 if kind == "imagenet" and args.num_classes == 10 else args.num_classes
            with torch.device("meta"):
                count = sum(p.numel() for p in create_model(name, num_classes=classes).parameters())
            print(f"{name:20s} {kind:9s} {count / 1e6:8.2f}M  ({classes} classes)")
        return 0
    with torch.device("meta"):
        reference = create_model(args.name, num_classes=args.num_classes, in_channels=args.in_channels)
        model = create_model(
            args.name,
            num_classes=args.num_classes,
            in_channels=args.in_channels,
            norm_layer=args.norm,
            placement=args.placement,
        )
    modules = dict(model.named_modules())
    for name, module in reference.named_modules():
        if type(module) is torch.nn.BatchNorm2d:
            print(f"{name:40s} {type(modules[name]).__name__}({module.num_features})")
    return 0
