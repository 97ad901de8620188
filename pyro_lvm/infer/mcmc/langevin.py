r"""Metropolis-adjusted (MALA) and unadjusted (ULA) Langevin steps: a pure functional core.

A potential :math:`V(x) = -\log \pi(x) + \text{const}` and its gradient define the
Langevin proposal with step size :math:`\eta`,

.. math::

    x' = x - \eta \nabla V(x) + \sqrt{2\eta}\,\xi, \qquad \xi \sim \mathcal N(0, I),

i.e. :math:`q(x' \mid x) = \mathcal N(x - \eta\nabla V(x), 2\eta I)`. MALA accepts
:math:`x'` with probability :math:`\min(1, e^{\log a})`,

.. math::

    \log a = V(x) - V(x') - \frac{\lVert x - x' + \eta\nabla V(x')\rVert^2}{4\eta}
             + \frac{\lVert x' - x + \eta\nabla V(x)\rVert^2}{4\eta},

which makes :math:`\pi` exactly invariant. ULA (``mh=False``) always accepts and is
biased by :math:`O(\eta)`.

The state caches the potential and its gradient at the current position, so one step
costs one gradient evaluation (at the proposal). Positions carry a batch of independent
chains on the left: ``position.shape == batch_shape + event_shape`` and the potential
function returns one potential per chain (shape ``batch_shape``). Chains never interact:
the gradient of ``potentials.sum()`` is each chain's own gradient, and each chain gets its
own accept/reject decision.

A non-finite potential or gradient at a proposal is a rejection (acceptance probability
0), so a chain never moves to a NaN state.

Step sizes are Python floats or tensors (per chain). With a float and one chain the
whole transition's bookkeeping is Python (see :mod:`~pyro_lvm.infer.mcmc.mh`); step-size
adaptation lives in :mod:`~pyro_lvm.infer.mcmc.adaptation`.

**Hooks for distributed chains.** :func:`potential_and_grad` and :func:`langevin_step`
take ``reduce_fn`` and ``generator``. ``reduce_fn(potential, grad) -> (potential, grad)``
receives the local (detached) potential and its gradient w.r.t. the position and returns
the global ones, e.g. an all-reduce sum across data-parallel ranks that each hold a shard
of the data while the chain position is replicated; a kept autograd graph stays the
local one (its value is shifted to the global potential), so each rank backpropagates its
own shard. ``generator`` (a :class:`torch.Generator` seeded alike on every rank) draws the
proposal noise and the MH uniform, so all ranks propose and decide identically. Both
default to the single-process behaviour (identity, global RNG).

References
----------
Roberts, Tweedie (1996), "Exponential convergence of Langevin distributions and their
discrete approximations", Bernoulli 2(4).
Roberts, Rosenthal (1998), "Optimal scaling of discrete approximations to Langevin
diffusions", JRSS B 60(1) (the 0.574 optimal acceptance rate).
Nesterov (2009), "Primal-dual subgradient methods for convex problems", Math. Program.
Hoffman, Gelman (2014), "The No-U-Turn Sampler", JMLR 15.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from pyro_lvm.infer.mcmc.mh import finite_log_ratio, mh_accept, select

__all__ = [
    "LangevinState",
    "LangevinInfo",
    "PotentialFn",
    "ReduceFn",
    "potential_and_grad",
    "langevin_init",
    "langevin_proposal",
    "mala_log_accept_ratio",
    "langevin_step",
    "standard_normal",
]

PotentialFn = Callable[[Tensor], Tensor]
#: ``reduce_fn(potential, grad) -> (potential, grad)``: local values to global ones
ReduceFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class LangevinState(NamedTuple):
    """State of a batch of Langevin chains.

    Attributes
    ----------
    position : Tensor
        Shape ``batch_shape + event_shape`` (one row of ``batch_shape`` per chain).
    potential : Tensor
        :math:`V` at ``position``, shape ``batch_shape`` (``()`` for a single chain).
    grad : Tensor
        :math:`\\nabla V` at ``position``, same shape as ``position``.
    """

    position: Tensor
    potential: Tensor
    grad: Tensor


class LangevinInfo(NamedTuple):
    """What happened in one transition (one entry per chain).

    For one chain with a float step size every field is a Python number (``float()``
    reads any of them either way).

    Attributes
    ----------
    accept_prob : Tensor or float
        :math:`\\min(1, a)`, shape ``batch_shape`` (1 for ULA, 0 at a non-finite proposal).
    accepted : Tensor or bool
        Boolean, shape ``batch_shape``.
    log_accept_ratio : Tensor or float
        :math:`\\log a` (``-inf`` at a non-finite proposal), shape ``batch_shape``.
    step_size : Tensor or float
        The step size used, broadcastable to ``batch_shape``.
    """

    accept_prob: Tensor | float
    accepted: Tensor | bool
    log_accept_ratio: Tensor | float
    step_size: Tensor | float


# -- helpers ------------------------------------------------------------------------------


def _event_dim(position: Tensor, event_dim: int | None) -> int:
    if event_dim is None:
        return position.dim()
    if not 0 <= event_dim <= position.dim():
        raise ValueError(
            f"event_dim must be between 0 and position.dim()={position.dim()}, got {event_dim}"
        )
    return event_dim


def _sum_event(t: Tensor, event_dim: int) -> Tensor:
    """Sum the trailing ``event_dim`` dimensions."""
    return t.sum(dim=tuple(range(t.dim() - event_dim, t.dim()))) if event_dim else t


def _pad_event(t: Tensor | float, event_dim: int) -> Tensor | float:
    """Append ``event_dim`` singleton dims so a per-chain tensor broadcasts to positions."""
    return t if isinstance(t, float) else t.reshape(t.shape + (1,) * event_dim)


def _as_step_size(step_size: float | Tensor, like: Tensor) -> float | Tensor:
    """A positive Python float stays a float (no device op, no sync); else a tensor."""
    if isinstance(step_size, (int, float)):
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        return float(step_size)
    step_size = torch.as_tensor(step_size, dtype=like.dtype, device=like.device)
    if not bool((step_size > 0).all()):
        raise ValueError(f"step_size must be positive, got {step_size.tolist()}")
    return step_size


def _sqrt(t: Tensor | float) -> Tensor | float:
    return math.sqrt(t) if isinstance(t, float) else t.sqrt()


# -- potential evaluation -----------------------------------------------------------------


def potential_and_grad(
    potential_fn: PotentialFn,
    position: Tensor,
    *,
    keep_graph: bool = False,
    reduce_fn: ReduceFn | None = None,
) -> tuple[Tensor, Tensor]:
    """Potentials (shape ``batch_shape``) and :math:`\\nabla V` at ``position``.

    Chains are independent, so the gradient of ``potentials.sum()`` is each chain's own
    gradient. ``position`` is detached: the gradient is with respect to the position only.

    Parameters
    ----------
    potential_fn : callable
        ``potential_fn(position) -> potentials``.
    position : Tensor
        Where to evaluate.
    keep_graph : bool
        Return the potential *with* its autograd graph (to other tensors the potential
        depends on, e.g. network parameters), so a caller can backpropagate it later
        without recomputing it. The gradient is still detached.
    reduce_fn : callable, optional
        ``reduce_fn(potential, grad) -> (potential, grad)`` maps the local values to the
        global ones (see the module docstring); a kept graph stays the local one.
    """
    position = position.detach().requires_grad_(True)
    with torch.enable_grad():
        potential = potential_fn(position)
        if potential.requires_grad:
            total = potential if potential.dim() == 0 else potential.sum()
            (grad,) = torch.autograd.grad(
                total, position, retain_graph=keep_graph, allow_unused=True
            )
        else:
            grad = None
    if grad is None:  # the potential does not depend on the position
        grad = torch.zeros_like(position)
    grad = grad.detach()
    if reduce_fn is not None:
        local = potential.detach()
        total, grad = reduce_fn(local, grad)
        if total is not local:  # one process: the local potential is the global one
            # the value is the global potential, the graph (if kept) the local one
            potential = potential + (total - local) if keep_graph else total
    return (potential if keep_graph else potential.detach()), grad


def langevin_init(
    position: Tensor,
    potential_fn: PotentialFn,
    *,
    keep_graph: bool = False,
    reduce_fn: ReduceFn | None = None,
) -> LangevinState:
    """The state at ``position`` (one potential and gradient evaluation)."""
    potential, grad = potential_and_grad(
        potential_fn, position, keep_graph=keep_graph, reduce_fn=reduce_fn
    )
    return LangevinState(position.detach(), potential, grad)


# -- the pieces of a step -----------------------------------------------------------------


def standard_normal(position: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A standard normal draw shaped like ``position``, from ``generator`` (on its
    device) or the global RNG."""
    if generator is None:
        return torch.randn_like(position)
    return torch.randn(position.shape, generator=generator, device=generator.device).to(position)


def langevin_proposal(
    state: LangevinState,
    step_size: float | Tensor,
    noise: Tensor | None = None,
    *,
    event_dim: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The proposal :math:`x - \eta\nabla V(x) + \sqrt{2\eta}\,\xi` (``noise`` is
    :math:`\xi`, drawn from :math:`\mathcal N(0, I)` when not given)."""
    event_dim = _event_dim(state.position, event_dim)
    eta = _pad_event(_as_step_size(step_size, state.position), event_dim)
    if noise is None:
        noise = standard_normal(state.position, generator)
    return state.position - eta * state.grad + _sqrt(2 * eta) * noise


def mala_log_accept_ratio(
    state: LangevinState,
    proposal: LangevinState,
    step_size: float | Tensor,
    *,
    event_dim: int | None = None,
) -> Tensor:
    r"""MALA's :math:`\log a` per chain, with the asymmetric-proposal correction

    .. math::

        \log a = V(x) - V(x') - \frac{\lVert x - x' + \eta\nabla V(x')\rVert^2}{4\eta}
                 + \frac{\lVert x' - x + \eta\nabla V(x)\rVert^2}{4\eta}.

    ``-inf`` where the proposal's potential or gradient is not finite.
    """
    event_dim = _event_dim(state.position, event_dim)
    return _log_accept_ratio(state, proposal, _as_step_size(step_size, state.position), event_dim)


def _log_accept_ratio(
    state: LangevinState, proposal: LangevinState, eta: float | Tensor, event_dim: int
) -> Tensor:
    log_ratio = _raw_log_accept_ratio(state, proposal, eta, event_dim)
    return finite_log_ratio(log_ratio, _sum_event(proposal.grad, event_dim))


def _raw_log_accept_ratio(
    state: LangevinState, proposal: LangevinState, eta: float | Tensor, event_dim: int
) -> Tensor:
    eta_b = _pad_event(eta, event_dim)
    x, x_new = state.position, proposal.position
    forward = _sum_event((x_new - x + eta_b * state.grad) ** 2, event_dim)  # -4eta log q(x'|x)
    backward = _sum_event((x - x_new + eta_b * proposal.grad) ** 2, event_dim)
    v, v_new = state.potential.detach(), proposal.potential.detach()
    return v - v_new + (forward - backward) / (4 * eta)


def langevin_step(
    state: LangevinState,
    potential_fn: PotentialFn,
    step_size: float | Tensor,
    *,
    mh: bool = True,
    event_dim: int | None = None,
    noise: Tensor | None = None,
    keep_graph: bool = False,
    generator: torch.Generator | None = None,
    reduce_fn: ReduceFn | None = None,
) -> tuple[LangevinState, LangevinInfo]:
    """One MALA (``mh=True``) or ULA (``mh=False``) transition of every chain.

    Parameters
    ----------
    state : LangevinState
        Current state (from :func:`langevin_init` or a previous step).
    potential_fn : callable
        ``potential_fn(position) -> potentials`` of shape ``batch_shape``.
    step_size : float or Tensor
        :math:`\\eta > 0`; a tensor of shape ``batch_shape`` gives per-chain step sizes.
    mh : bool
        Metropolis-Hastings correction (MALA). Without it (ULA) every finite proposal is
        accepted.
    event_dim : int, optional
        Number of trailing event dims of ``position`` (default: all, i.e. one chain).
    noise : Tensor, optional
        The standard normal :math:`\\xi` of the proposal (drawn when not given).
    keep_graph : bool
        Keep the proposal potential's autograd graph (see :func:`potential_and_grad`).
    generator : torch.Generator, optional
        Source of the proposal noise and the MH uniform (see the module docstring).
    reduce_fn : callable, optional
        Local-to-global potential and gradient (see :func:`potential_and_grad`).

    Returns
    -------
    (LangevinState, LangevinInfo)
        A non-finite proposal is always rejected, with ``accept_prob`` 0.
    """
    event_dim = _event_dim(state.position, event_dim)
    eta = _as_step_size(step_size, state.position)
    new_position = langevin_proposal(state, eta, noise, event_dim=event_dim, generator=generator)
    new_potential, new_grad = potential_and_grad(
        potential_fn, new_position, keep_graph=keep_graph, reduce_fn=reduce_fn
    )
    proposal = LangevinState(new_position.detach(), new_potential, new_grad)
    if state.potential.dim() == 0:
        # one chain: the transition's one host sync; a non-finite gradient makes the
        # reverse-proposal term non-finite, so testing the ratio alone suffices
        log_ratio = float(_raw_log_accept_ratio(state, proposal, eta, event_dim))
        if not math.isfinite(log_ratio):
            log_ratio = -math.inf
    else:
        log_ratio = _log_accept_ratio(state, proposal, eta, event_dim)
    accept_prob, accepted = mh_accept(log_ratio, mh=mh, generator=generator)
    new_state = LangevinState(
        select(accepted, proposal.position, state.position, event_dim),
        select(accepted, proposal.potential, state.potential, 0),
        select(accepted, proposal.grad, state.grad, event_dim),
    )
    return new_state, LangevinInfo(accept_prob, accepted, log_ratio, eta)
