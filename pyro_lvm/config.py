"""Moved to :mod:`pyro_lvm.experiments.config`; this name stays importable."""

from pyro_lvm.experiments.config import *  # noqa: F403
from pyro_lvm.experiments.config import __all__  # noqa: F401
