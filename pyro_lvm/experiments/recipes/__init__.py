"""Registry of ready experiments: CLI model name -> recipe module.

Each recipe module defines ``build(config, data) -> Experiment`` (see
:mod:`pyro_lvm.experiments.recipes.base`). Modules are imported lazily so a broken or heavy recipe
never slows down the others.
"""

from __future__ import annotations

import importlib

from pyro_lvm.experiments.recipes.base import Experiment

__all__ = ["COMMON_FLAGS", "MODEL_FLAGS", "RECIPES", "Experiment", "get_recipe", "model_flags"]

RECIPES: dict[str, str] = {
    "ppca": "pyro_lvm.experiments.recipes.ppca",
    "vae": "pyro_lvm.experiments.recipes.vae",
    "vae-flow": "pyro_lvm.experiments.recipes.vae_flow",
    "lae": "pyro_lvm.experiments.recipes.lae",
    "dlgm": "pyro_lvm.experiments.recipes.dlgm",
    "sbn": "pyro_lvm.experiments.recipes.sbn",
    "ae-gmm": "pyro_lvm.experiments.recipes.ae_gmm",
    "custom": "pyro_lvm.experiments.recipes.custom",
}


def get_recipe(name: str):
    """The recipe module registered as ``name`` (one-line error for unknown names)."""
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(RECIPES))}")
    return importlib.import_module(RECIPES[name])


#: settings (TrainConfig fields and CLI run options) every model takes
COMMON_FLAGS = frozenset(
    """config dataset data_dir download likelihood validation epochs batch_size lr optimizer
    lr_schedule lr_step lr_gamma clip_norm early_stopping seed latent_dim eval_samples
    eval_ais device out resume overwrite no_figures no_progress threads devices strategy
    accelerator num_nodes""".split()
)
_NETWORK = frozenset("hidden_dim depth layer_norm orthogonal_init arch".split())
_LANGEVIN = frozenset(
    "num_steps step_size target_accept_prob mh adapt_step_size refine_steps".split()
)

#: the model-specific settings of each recipe (a flag outside them is refused)
MODEL_FLAGS: dict[str, frozenset[str]] = {
    "ppca": frozenset({"fit"}),
    "vae": _NETWORK | {"analytic_kl", "jit_compile"},
    "vae-flow": _NETWORK | {"num_flows", "flow"},
    "lae": _NETWORK
    | _LANGEVIN
    | {"test_scale", "precondition", "feature_norm", "jacobian", "project_noise", "jit_compile"},
    "dlgm": _NETWORK | _LANGEVIN,
    "sbn": frozenset({"hidden_dim", "depth", "estimator", "num_particles", "num_layers"}),
    "ae-gmm": frozenset({"hidden_dim", "depth", "layer_norm", "num_components"}),
    # your build(config, ...) reads the network settings if it likes; another recipe's
    # flags (an estimator, Langevin steps) would be recorded and silently ignored
    "custom": _NETWORK | {"model_file"},
}


def model_flags(name: str) -> frozenset[str] | None:
    """Every setting ``name`` takes, or ``None`` (all) for a recipe without a declaration."""
    if name not in MODEL_FLAGS:
        return None
    return COMMON_FLAGS | MODEL_FLAGS[name]
