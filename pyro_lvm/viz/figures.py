"""Deprecated location: the plot functions live in :mod:`pyro_lvm.experiments.figures`.

Importing this module no longer selects a matplotlib backend.
"""

from pyro_lvm.experiments.figures import (
    image_grid,
    interpolation,
    latent_scatter,
    reconstructions,
    sampler_trace,
    samples_figure,
    to_images,
    training_curves,
)

__all__ = [
    "image_grid",
    "reconstructions",
    "latent_scatter",
    "interpolation",
    "training_curves",
    "sampler_trace",
    "samples_figure",
    "to_images",
]
