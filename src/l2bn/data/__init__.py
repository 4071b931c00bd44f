"""Datasets for the experiments: ``build_data(name, data_dir)`` → train / train-eval / test splits."""
from .vision import DataBundle, DataError, TensorImageDataset, build_data, list_datasets

__all__ = ["DataBundle", "DataError", "TensorImageDataset", "build_data", "list_datasets"]
