"""Moved to :mod:`pyro_lvm.experiments.rundir`; this name stays importable."""

from pyro_lvm.experiments.rundir import *  # noqa: F403
from pyro_lvm.experiments.rundir import __all__  # noqa: F401
