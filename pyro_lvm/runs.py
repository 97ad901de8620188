"""Moved to :mod:`pyro_lvm.experiments.runs`; this name stays importable."""

from pyro_lvm.experiments.runs import *  # noqa: F403
from pyro_lvm.experiments.runs import __all__  # noqa: F401
