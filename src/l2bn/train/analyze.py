"""``analyze``: test accuracy and angle metrics of a saved model, on the data it was trained on or another set."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..data import DataBundle, build_data
from .config import TrainConfig
from .ddp import DistEnv, check_device
from .evaluate import evaluate
from .loaders import make_loader, prepare_data
from .model import ModelFn, run_model_fn
from .rundir import RunDir

__all__ = ["analyze_checkpoint"]


def analyze_checkpoint(
    path: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    max_batches: int | None = None,
    model_fn: ModelFn | None = None,
    data: DataBundle | None = None,
) -> dict[str, Any]:
    """Test accuracy and angle metrics of a saved model (``last.pt``/``best.pt``, loaded with
    ``weights_only=True``); ``dataset`` defaults to the one it was trained on (and its training subset)."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 (or None: every batch), got {max_batches}")
    dev = check_device(device)
    ckpt = RunDir.load_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["config"])
    if dataset is None:
        trained_on = dataclasses.replace(config, data_dir=data_dir or config.data_dir, download=False)
        data = prepare_data(trained_on, data, DistEnv())
    data = data or build_data(dataset, data_dir, augment=False)
    if data.num_classes != ckpt["num_classes"] or data.in_channels != ckpt["in_channels"]:
        raise ValueError(
            f"{path} was trained for {ckpt['num_classes']} classes / {ckpt['in_channels']} channels, dataset "
            f"{data.name!r} has {data.num_classes} / {data.in_channels}"
        )
    net = run_model_fn(config, model_fn)(num_classes=data.num_classes, in_channels=data.in_channels, norm=config.norm)
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: its weights do not fit model {config.model!r} with norm {config.norm!r} "
                         f"({str(exc).splitlines()[0]}); was the file edited or taken from another run?") from None
    net.to(dev)
    batch = max(config.recipe.batch_size, 256)
    result = evaluate(
        net, make_loader(data.test, batch, 0, dev), make_loader(data.train_eval, batch, 0, dev),
        num_classes=data.num_classes, device=dev, max_batches=max_batches,
    )
    return {"checkpoint": str(path), "epoch": ckpt["epoch"], "dataset": data.name, "model": config.model,
            "norm": config.norm, **result}
