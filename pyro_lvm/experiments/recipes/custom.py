"""``pyro-lvm train custom --model-file PATH.py:NAME`` (or ``MODULE:NAME``): your own model.

``NAME`` is a callable ``NAME(config, data_dim, likelihood)`` (see
:class:`~pyro_lvm.experiments.config.TrainConfig` for ``config``; ``likelihood`` is the
:class:`~pyro_lvm.models.likelihoods.Likelihood` chosen by ``--likelihood``) returning
either

* an :class:`~pyro_lvm.experiments.recipes.base.Experiment` (any inference driver), or
* a model object following :class:`~pyro_lvm.experiments.protocol.TrainableModel`: an
  :class:`torch.nn.Module` with Pyro programs ``model(x)`` and ``guide(x)`` over a data
  plate; it is trained by SVI (:class:`~pyro_lvm.infer.ModuleSVI` with ``Trace_ELBO``,
  ``--lr``, ``--optimizer``, ``--clip-norm``), evaluated with its guide as proposal, and
  sampled with its ``generate(n)`` method when it has one.

Loading a file runs its code, so it happens only when the user names the file: a run's
``config.json`` records ``model_file`` but ``evaluate``, ``sample`` and
:func:`pyro_lvm.load_run` import it only when passed ``model_file`` again.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.protocol import TrainableModel, missing
from pyro_lvm.experiments.recipes.base import Experiment
from pyro_lvm.models.likelihoods import Likelihood

__all__ = ["build", "load_object"]


def load_object(spec: str):
    """The object ``NAME`` of ``path.py:NAME`` or ``module:NAME`` (one-line errors)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ValueError(
            f"--model-file {spec!r} must be PATH.py:NAME or MODULE:NAME (e.g. mymodel.py:build)"
        )
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--model-file: no file {path}; pass PATH.py:NAME")
        module_name = f"pyro_lvm_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as err:
            raise ValueError(f"--model-file: cannot import {source!r} ({err})") from None
    if not hasattr(module, name):
        raise ValueError(f"--model-file: {source} has no {name!r}")
    return getattr(module, name)


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    if not config.model_file:
        raise ValueError("train custom needs --model-file PATH.py:NAME (your model's build)")
    factory = load_object(config.model_file)
    built = factory(config, data_dim, likelihood)
    if isinstance(built, Experiment):
        return built
    lacking = missing(built, TrainableModel)
    if not isinstance(built, nn.Module) or "model" in lacking:
        raise ValueError(
            f"--model-file {config.model_file} returned {type(built).__name__}: it must return "
            "an Experiment or an nn.Module with model(x) and guide(x) methods"
        )
    if lacking:
        raise ValueError(
            f"--model-file {config.model_file}: the model has no {', '.join(lacking)}; add "
            "guide(x) or return an Experiment with another inference driver "
            "(pyro_lvm.experiments.protocol.TrainableModel)"
        )
    from pyro_lvm.experiments.recipes.vae import make_optimizer
    from pyro_lvm.infer import ModuleSVI

    svi = ModuleSVI(
        built.model,
        built.guide,
        make_optimizer(list(built.parameters()), config),
        clip_norm=config.clip_norm,
    )
    return Experiment(lvm=built, inference=svi, modules=built)
