"""Build a run's experiment from its config: :func:`build_experiment`, :func:`setup_run`.

The one place a :class:`~pyro_lvm.experiments.config.TrainConfig` becomes an
:class:`~pyro_lvm.experiments.recipes.Experiment` (model, inference, modules), shared by
training (:mod:`~pyro_lvm.experiments.lifecycle`) and loading
(:func:`~pyro_lvm.experiments.runs.load_run`).
"""

from __future__ import annotations

import os
import re

import pyro
import torch

from pyro_lvm.data import DataBundle, load_dataset
from pyro_lvm.experiments.checkpoint import preserved_rng
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
    _check_size(config, data_dim)
    likelihood = make_likelihood(config.likelihood)
    try:
        experiment = get_recipe(config.model).build(config, data_dim, likelihood)
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and not _too_large(err):
            raise
        raise _cannot_allocate(config, data_dim, _allocation(err)) from None
    if config.clip_norm is not None:
        if not hasattr(experiment.inference, "clip_norm"):
            raise RunError(f"--clip-norm does not apply to {config.model} (no gradient steps)")
        experiment.inference.clip_norm = config.clip_norm
    experiment.modules.to(config.device)
    return experiment


def _check_size(config: TrainConfig, data_dim: int) -> None:
    """Refuse networks whose parameters alone exceed the memory of ``config.device``,
    measured by building them on the meta device (shapes, no storage) first: the real
    build might otherwise get the memory (overcommitted) and fill it while initialising.
    A user's ``custom`` build is not run twice; a recipe that cannot be built on the meta
    device is left to the real build."""
    if config.model == "custom":
        return
    try:
        with preserved_rng(), torch.device("meta"):
            likelihood = make_likelihood(config.likelihood)
            experiment = get_recipe(config.model).build(config, data_dim, likelihood)
    except RuntimeError as err:
        if _too_large(err):
            raise _cannot_allocate(config, data_dim, "more than any memory") from None
        return  # e.g. a value read during the build (.item()): no shapes without data
    modules = experiment.modules
    need = sum(t.numel() * t.element_size() for t in (*modules.parameters(), *modules.buffers()))
    have = _memory_bytes(config.device)
    if have is not None and need > have:
        detail = f"{need / 1e9:.3g} GB of parameters, the machine has {have / 1e9:.3g} GB"
        raise _cannot_allocate(config, data_dim, detail)


def _memory_bytes(device: str) -> int | None:
    """The memory of ``device`` (physical memory for the CPU), or ``None`` if unknown."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def _too_large(err: BaseException) -> bool:
    return "allocate" in str(err) or "overflow" in str(err)


def _cannot_allocate(config: TrainConfig, data_dim: int, detail: str) -> RunError:
    return RunError(
        f"cannot allocate the {config.model} networks ({detail}) for --hidden-dim "
        f"{config.hidden_dim}, --latent-dim {config.latent_dim} and {data_dim}-dimensional "
        "data; pass a smaller --hidden-dim or --latent-dim"
    )


def _allocation(err: BaseException) -> str:
    """``"64 GB requested"`` from torch's allocation error, else the error's kind."""
    found = re.search(r"allocate (\d+) bytes", str(err))
    if found is None:
        return "out of memory" if "allocate" in str(err) else "more than any memory"
    return f"{int(found.group(1)) / 1e9:.3g} GB requested"
