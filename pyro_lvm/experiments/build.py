"""Build a run's experiment from its config: :func:`build_experiment`, :func:`setup_run`.

The one place a :class:`~pyro_lvm.experiments.config.TrainConfig` becomes an
:class:`~pyro_lvm.experiments.recipes.Experiment` (model, inference, modules), shared by
training (:mod:`~pyro_lvm.experiments.lifecycle`) and loading
(:func:`~pyro_lvm.experiments.runs.load_run`).
"""

from __future__ import annotations

import dataclasses

import pyro
import torch

from pyro_lvm.data import DataBundle, load_dataset
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes import Experiment, get_recipe
from pyro_lvm.models.likelihoods import LIKELIHOODS, make_likelihood

__all__ = ["RunError", "build_experiment", "check_device", "setup_run"]


class RunError(ValueError):
    """A run that cannot go ahead as asked (printed by the CLI as one line, exit 2)."""


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {device} requested but CUDA is not available; use --device cpu")


def setup_run(
    config: TrainConfig, data: DataBundle | None = None
) -> tuple[Experiment, DataBundle]:
    """Seed, load the data and build the experiment described by ``config``."""
    config.validate()
    check_device(config.device)
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, config.download)
    data = data.for_likelihood(LIKELIHOODS[config.likelihood])
    # the run's length decides whether compiling pays off (TrainConfig.compile_backend)
    built = dataclasses.replace(config, jit_compile=config.compile_backend(data.num_train))
    return build_experiment(built, data.data_dim), data


def build_experiment(config: TrainConfig, data_dim: int) -> Experiment:
    """Seed and build the experiment described by ``config`` for ``data_dim`` inputs
    (no data needed: :func:`pyro_lvm.load_run` rebuilds a trained run this way)."""
    config.validate()
    check_device(config.device)
    # the data are checked once up front; per-step argument validation only costs time
    pyro.enable_validation(False)
    pyro.set_rng_seed(config.seed)
    likelihood = make_likelihood(config.likelihood)
    experiment = get_recipe(config.model).build(config, data_dim, likelihood)
    if config.clip_norm is not None:
        if not hasattr(experiment.inference, "clip_norm"):
            raise RunError(f"--clip-norm does not apply to {config.model} (no gradient steps)")
        experiment.inference.clip_norm = config.clip_norm
    experiment.modules.to(config.device)
    return experiment
