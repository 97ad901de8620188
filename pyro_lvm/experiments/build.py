"""Build a run's experiment from its config: :func:`build_experiment`, :func:`setup_run`.

The one place a :class:`~pyro_lvm.experiments.config.TrainConfig` becomes an
:class:`~pyro_lvm.experiments.recipes.Experiment` (model, inference, modules), shared by
training (:mod:`~pyro_lvm.experiments.lifecycle`) and loading
(:func:`~pyro_lvm.experiments.runs.load_run`).
"""

from __future__ import annotations

import re

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
    """Seed every global generator with ``config.seed``, load the data and build the
    experiment described by ``config`` (validated by the caller: ``config.validate()``).

    Training owns its process's random state (a run is reproducible from its seed), so
    this seeds Python's, NumPy's and torch's generators; :func:`build_experiment` alone
    leaves them to the caller.
    """
    check_device(config.device)
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, config.download)
    data = data.for_likelihood(LIKELIHOODS[config.likelihood])
    pyro.set_rng_seed(config.seed)
    return build_experiment(config, data.data_dim), data


def build_experiment(config: TrainConfig, data_dim: int) -> Experiment:
    """Build the experiment described by ``config`` for ``data_dim`` inputs (no data
    needed: :func:`pyro_lvm.load_run` rebuilds a trained run this way).

    ``config`` must be valid (``config.validate()``). The networks are initialised from
    torch's global generator as it stands: seed it first for a reproducible model
    (:func:`setup_run` does). No other global state is touched.
    """
    check_device(config.device)
    likelihood = make_likelihood(config.likelihood)
    try:
        experiment = get_recipe(config.model).build(config, data_dim, likelihood)
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        raise RunError(
            f"cannot allocate the {config.model} networks ({_allocation(err)}) for "
            f"--hidden-dim {config.hidden_dim}, --latent-dim {config.latent_dim} and "
            f"{data_dim}-dimensional data; pass a smaller --hidden-dim or --latent-dim"
        ) from None
    if config.clip_norm is not None:
        if not hasattr(experiment.inference, "clip_norm"):
            raise RunError(f"--clip-norm does not apply to {config.model} (no gradient steps)")
        experiment.inference.clip_norm = config.clip_norm
    experiment.modules.to(config.device)
    return experiment


def _allocation(err: BaseException) -> str:
    """``"64 GB requested"`` from torch's allocation error, else the error's kind."""
    found = re.search(r"allocate (\d+) bytes", str(err))
    if found is None:
        return "out of memory"
    return f"{int(found.group(1)) / 1e9:.3g} GB requested"
