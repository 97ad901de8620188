"""Deprecated location: the run figures live in :mod:`pyro_lvm.experiments.figures`."""

from pyro_lvm.experiments.figures import save_sample_grid, write_figures

__all__ = ["write_figures", "save_sample_grid"]
