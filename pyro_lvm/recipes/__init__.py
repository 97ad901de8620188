"""Registry of ready experiments: CLI model name -> recipe module.

Each recipe module defines ``build(config, data) -> Experiment`` (see
:mod:`pyro_lvm.recipes.base`). Modules are imported lazily so a broken or heavy recipe
never slows down the others.
"""

from __future__ import annotations

import importlib

from pyro_lvm.recipes.base import Experiment

__all__ = ["RECIPES", "Experiment", "get_recipe"]

RECIPES: dict[str, str] = {
    "ppca": "pyro_lvm.recipes.ppca",
    "vae": "pyro_lvm.recipes.vae",
    "lae": "pyro_lvm.recipes.lae",
    "dlgm": "pyro_lvm.recipes.dlgm",
    "sbn": "pyro_lvm.recipes.sbn",
    "ae-gmm": "pyro_lvm.recipes.ae_gmm",
}


def get_recipe(name: str):
    """The recipe module registered as ``name`` (one-line error for unknown names)."""
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(RECIPES))}")
    return importlib.import_module(RECIPES[name])
