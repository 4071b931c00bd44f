"""TAU Urban Acoustic Scenes 2020 Mobile (DCASE 2020 task 1a): the folder layout, Hu et al.'s log-mel
features, the extraction cache and the dataset (one concern a module; it needs librosa and soundfile)."""
from .cache import default_cache_dir, extract_split
from .dataset import DEFAULT_PARAMS, AudioFeatureDataset, SpecAugment, tau2020, with_spec_masks
from .features import FeatureParams, logmel_features, scaled_logmel, stack_deltas
from .layout import DEVICE_GROUPS, DEVICES, SCENES, SPLIT_FILES, SUBFOLDER, Split, device_of, find_root, read_split

__all__ = [
    "DEFAULT_PARAMS",
    "DEVICES",
    "DEVICE_GROUPS",
    "SCENES",
    "SPLIT_FILES",
    "SUBFOLDER",
    "AudioFeatureDataset",
    "FeatureParams",
    "SpecAugment",
    "Split",
    "default_cache_dir",
    "device_of",
    "extract_split",
    "find_root",
    "logmel_features",
    "read_split",
    "scaled_logmel",
    "stack_deltas",
    "tau2020",
    "with_spec_masks",
]
