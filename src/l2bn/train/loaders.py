"""A run's data: the bundle its config names (spec masks, training subset) and the DataLoaders over it."""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..data import DataBundle, build_data
from ..data.batched import InMemoryBatches, in_memory_images
from .config import TrainConfig
from .ddp import DistEnv

__all__ = ["make_eval_loader", "make_loader", "make_train_loader", "prepare_data", "shard"]


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


def make_eval_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader | InMemoryBatches:
    """Batches of an evaluation set in order: gathered as whole tensors when it is an in-memory image set
    without random transforms (bit-identical to the DataLoader's batches, without per-sample calls), else
    :func:`make_loader`'s DataLoader."""
    source = in_memory_images(dataset)
    if source is not None and source.augment is None:
        return InMemoryBatches(dataset, source, batch_size, device=device)
    return make_loader(dataset, batch_size, workers, device)


def make_train_loader(config: TrainConfig, dataset: Dataset, batch_size: int, device: torch.device,
                      sampler: Sampler, generator: torch.Generator) -> DataLoader | InMemoryBatches:
    """The training batches: a DataLoader with per-sample transforms (workers restarted every epoch, seeded
    from ``generator``), or with ``config.augment == "batched"`` whole-batch crop/flip drawn from ``generator``."""
    if config.augment == "batched":
        source = in_memory_images(dataset)
        if source is None:
            raise ValueError(f"augment='batched' needs an in-memory image set whose augmentation is random crop "
                             f"and/or horizontal flip (digits, fashion-mnist, cifar10, cifar100); {config.dataset!r} "
                             "is not one: use augment='per-sample'")
        return InMemoryBatches(dataset, source, batch_size, sampler=sampler, drop_last=True, generator=generator,
                               device=device)
    # not persistent: each epoch's workers take their RNG seeds from generator, re-seeded per epoch
    return make_loader(dataset, batch_size, config.workers, device, persistent=False, sampler=sampler,
                       drop_last=True, generator=generator)
