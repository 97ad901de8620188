r"""One HMC transition per chain (leapfrog integrator + the shared MH decision).

With leapfrog step :math:`\epsilon = \sqrt{2\eta}` and unit mass, one leapfrog step is
MALA with step :math:`\eta` (the same proposal and acceptance), which the tests use as a
cross-check. Non-finite trajectories are rejected
(:func:`~pyro_lvm.infer.mcmc.mh.finite_log_ratio`).

References
----------
Neal (2011), "MCMC using Hamiltonian dynamics", Handbook of MCMC.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_lvm.infer.mcmc.langevin import (
    LangevinInfo,
    LangevinState,
    PotentialFn,
    ReduceFn,
    potential_and_grad,
    standard_normal,
)
from pyro_lvm.infer.mcmc.mh import finite_log_ratio, mh_accept, select

__all__ = ["hmc_step"]


def hmc_step(
    state: LangevinState,
    potential_fn: PotentialFn,
    step_size: Tensor,
    num_leapfrog: int,
    *,
    mh: bool = True,
    generator: torch.Generator | None = None,
    reduce_fn: ReduceFn | None = None,
) -> tuple[LangevinState, LangevinInfo]:
    r"""One HMC transition of every chain (event dim 1, step sizes per chain, shape
    ``batch_shape``) with ``num_leapfrog`` leapfrog steps of size :math:`\sqrt{2\eta}`."""
    eps = (2 * step_size).sqrt().unsqueeze(-1)
    momentum = standard_normal(state.position, generator)
    p = momentum - 0.5 * eps * state.grad
    position = state.position
    for i in range(num_leapfrog):
        position = position + eps * p
        potential, grad = potential_and_grad(potential_fn, position, reduce_fn=reduce_fn)
        if i < num_leapfrog - 1:
            p = p - eps * grad
    p = p - 0.5 * eps * grad
    log_ratio = state.potential - potential + 0.5 * (momentum.pow(2).sum(-1) - p.pow(2).sum(-1))
    log_ratio = finite_log_ratio(log_ratio, grad.sum(-1))
    accept_prob, accepted = mh_accept(log_ratio, mh=mh, generator=generator)
    new_state = LangevinState(
        select(accepted, position, state.position, 1),
        select(accepted, potential, state.potential, 0),
        select(accepted, grad, state.grad, 1),
    )
    return new_state, LangevinInfo(accept_prob, accepted, log_ratio, step_size)
