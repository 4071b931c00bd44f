"""A run's data: the bundle its config names (spec masks, training subset) and the DataLoaders over it."""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import DataBundle, build_data
from .config import TrainConfig
from .ddp import DistEnv

__all__ = ["make_loader", "prepare_data", "shard"]


def prepare_data(config: TrainConfig, data: DataBundle | None, env: DistEnv) -> DataBundle:
    """``data`` (default: ``config``'s dataset, downloaded by rank 0 only), with the recipe's spectrogram masks,
    ``config.train_subset``'s stratified training subset and the validation hold-out, imbalance and label
    noise of ``config`` applied (:func:`~l2bn.data.training_split.carve_training_split`)."""
    from ..data.subset import stratified_subset
    from ..data.training_split import carve_training_split

    data = data or build_data(config.dataset, config.data_dir, download=config.download and env.is_main)
    if config.recipe.spec_masks:
        from ..data.tau2020 import with_spec_masks

        data = with_spec_masks(data)
    if config.train_subset is not None:
        train, train_eval = stratified_subset((data.train, data.train_eval), config.train_subset)
        data = dataclasses.replace(data, train=train, train_eval=train_eval)
    if config.val_size is not None or config.imbalance is not None or config.label_noise:
        train, train_eval, val = carve_training_split(data.train, data.train_eval, data.num_classes,
                                                      val_size=config.val_size, imbalance=config.imbalance,
                                                      label_noise=config.label_noise)
        data = dataclasses.replace(data, train=train, train_eval=train_eval, val=val)
    return data


def shard(dataset: Dataset, env: DistEnv) -> Dataset:
    """Every ``world_size``-th sample from ``rank``: disjoint shards that cover the set exactly once."""
    if not env.distributed:
        return dataset
    return Subset(dataset, range(env.rank, len(dataset), env.world_size))


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device, persistent: bool = True,
                **kw) -> DataLoader:
    """A DataLoader pinning memory for CUDA; its workers persist across epochs if ``persistent``."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        **kw,
    )
