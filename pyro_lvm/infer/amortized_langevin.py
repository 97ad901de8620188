"""Compatibility path: the ALD kernel now lives in
:mod:`pyro_lvm.infer.mcmc.amortized_langevin` (its pieces in :mod:`pyro_lvm.infer.mcmc`)."""

from pyro_lvm.infer.mcmc.amortized_langevin import AmortizedLangevin, RankConditionWarning

__all__ = ["AmortizedLangevin", "RankConditionWarning"]
