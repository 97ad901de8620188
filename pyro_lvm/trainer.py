"""Moved to :mod:`pyro_lvm.experiments.trainer`; this name stays importable."""

from pyro_lvm.experiments.trainer import *  # noqa: F403
from pyro_lvm.experiments.trainer import __all__  # noqa: F401
