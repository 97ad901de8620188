"""Datasets: embedded digits, torchvision image sets, user tensors, synthetic data."""

from pyro_lvm.data.bundle import DataBundle, binarize, prepare_for_likelihood, to_8bit_symmetric
from pyro_lvm.data.datasets import DATASETS, load_dataset, load_digits
from pyro_lvm.data.synthetic import (
    SyntheticTruth,
    binary_latent_data,
    binary_latent_log_likelihood,
    ppca_data,
)

__all__ = [
    "DATASETS",
    "DataBundle",
    "SyntheticTruth",
    "binarize",
    "binary_latent_data",
    "binary_latent_log_likelihood",
    "load_dataset",
    "load_digits",
    "ppca_data",
    "prepare_for_likelihood",
    "to_8bit_symmetric",
]
