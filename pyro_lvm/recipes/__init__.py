"""Deprecated location: the recipes live in :mod:`pyro_lvm.experiments.recipes`.

``pyro_lvm.recipes`` and every ``pyro_lvm.recipes.<name>`` resolve to the very same
module objects (not copies), so ``Experiment`` and the registry are shared.
"""

import importlib
import sys

from pyro_lvm.experiments import recipes as _recipes
from pyro_lvm.experiments.recipes import *  # noqa: F403
from pyro_lvm.experiments.recipes import __all__  # noqa: F401

_SUBMODULES = ("ae_gmm", "base", "custom", "dlgm", "lae", "ppca", "sbn", "vae", "vae_flow")
for _name in _SUBMODULES:
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"{_recipes.__name__}.{_name}")
