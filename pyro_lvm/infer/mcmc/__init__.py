r"""MCMC for pyro_lvm, laid out like :mod:`pyro.infer.mcmc`: a pure functional core in
small modules and a thin :class:`~pyro.infer.mcmc.mcmc_kernel.MCMCKernel` shell.

=================================  ======================================================
module                             contents
=================================  ======================================================
:mod:`.mh`                         the MH accept decision shared by MALA and HMC
:mod:`.langevin`                   ``LangevinState``/``LangevinInfo``, ``langevin_step``
:mod:`.hmc`                        ``hmc_step`` (AIS's HMC transitions)
:mod:`.adaptation`                 dual averaging ``init/update/final``, step-size search
:mod:`.chain`                      which encoder parameters form the ALD chain, per batch
:mod:`.ald`                        the pure ALD transition over a bound batch
:mod:`.mixing`                     mixing summaries (ESS, moves) and their warnings
:mod:`.inference_data`             ``to_inference_data``: any MCMC run for ArviZ
:mod:`.amortized_langevin`         the ``AmortizedLangevin`` kernel shell
=================================  ======================================================

**Distributed hook.** Every transition function takes two optional arguments that default
to single-process behaviour: ``reduce_fn(potential, grad) -> (potential, grad)`` maps the
local potential and its gradient w.r.t. the chain position to global values (e.g. an
all-reduce sum over data-parallel ranks, each holding a shard of the batch while the chain
parameters are replicated; a kept graph stays the local one so each rank backpropagates
its own shard), and ``generator`` (a :class:`torch.Generator` seeded alike on every rank)
draws the proposal noise and the MH uniform so all ranks propose and decide identically.
:class:`AmortizedLangevin` forwards its ``reduce_fn=`` and ``generator=`` arguments there.
"""

from pyro_lvm.infer.mcmc.adaptation import (
    DualAveragingState,
    dual_averaging_final,
    dual_averaging_init,
    dual_averaging_step,
    dual_averaging_step_size,
    dual_averaging_update,
    find_step_size,
)
from pyro_lvm.infer.mcmc.amortized_langevin import AmortizedLangevin, RankConditionWarning
from pyro_lvm.infer.mcmc.hmc import hmc_step
from pyro_lvm.infer.mcmc.inference_data import to_inference_data
from pyro_lvm.infer.mcmc.langevin import (
    LangevinInfo,
    LangevinState,
    langevin_init,
    langevin_proposal,
    langevin_step,
    mala_log_accept_ratio,
    potential_and_grad,
)
from pyro_lvm.infer.mcmc.mh import finite_log_ratio, mh_accept, select

__all__ = [
    "AmortizedLangevin",
    "RankConditionWarning",
    "LangevinState",
    "LangevinInfo",
    "potential_and_grad",
    "langevin_init",
    "langevin_proposal",
    "mala_log_accept_ratio",
    "langevin_step",
    "hmc_step",
    "to_inference_data",
    "mh_accept",
    "finite_log_ratio",
    "select",
    "DualAveragingState",
    "dual_averaging_init",
    "dual_averaging_update",
    "dual_averaging_final",
    "dual_averaging_step",
    "dual_averaging_step_size",
    "find_step_size",
]
