"""Moved to :mod:`pyro_lvm.experiments.schedules`; this name stays importable."""

from pyro_lvm.experiments.schedules import *  # noqa: F403
from pyro_lvm.experiments.schedules import __all__  # noqa: F401
