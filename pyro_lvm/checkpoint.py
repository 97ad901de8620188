"""Moved to :mod:`pyro_lvm.experiments.checkpoint`; this name stays importable."""

from pyro_lvm.experiments.checkpoint import *  # noqa: F403
from pyro_lvm.experiments.checkpoint import __all__  # noqa: F401
