"""Moved to :mod:`pyro_lvm.experiments.evaluation`; this name stays importable."""

from pyro_lvm.experiments.evaluation import *  # noqa: F403
from pyro_lvm.experiments.evaluation import __all__  # noqa: F401
