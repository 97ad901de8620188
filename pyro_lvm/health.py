"""Moved to :mod:`pyro_lvm.experiments.health`; this name stays importable."""

from pyro_lvm.experiments.health import *  # noqa: F403
from pyro_lvm.experiments.health import __all__  # noqa: F401
