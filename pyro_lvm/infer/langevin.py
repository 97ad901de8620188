"""Compatibility path: the Langevin core and dual averaging now live in
:mod:`pyro_lvm.infer.mcmc.langevin` and :mod:`pyro_lvm.infer.mcmc.adaptation`."""

from pyro_lvm.infer.mcmc.adaptation import (
    DualAveragingState,
    dual_averaging_final,
    dual_averaging_init,
    dual_averaging_step,
    dual_averaging_step_size,
    dual_averaging_update,
    find_step_size,
)
from pyro_lvm.infer.mcmc.langevin import (
    LangevinInfo,
    LangevinState,
    langevin_init,
    langevin_proposal,
    langevin_step,
    mala_log_accept_ratio,
    potential_and_grad,
)

__all__ = [
    "LangevinState",
    "LangevinInfo",
    "potential_and_grad",
    "langevin_init",
    "langevin_proposal",
    "mala_log_accept_ratio",
    "langevin_step",
    "DualAveragingState",
    "dual_averaging_init",
    "dual_averaging_update",
    "dual_averaging_final",
    "dual_averaging_step",
    "dual_averaging_step_size",
    "find_step_size",
]
