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

Step sizes are adapted by dual averaging (Nesterov 2009, in the form of Hoffman & Gelman
2014, Algorithm 6; the same recursion as :class:`pyro.ops.dual_averaging.DualAveraging`),
written here as a pure function of a :class:`DualAveragingState` so that it can run per
chain on tensors and be checkpointed.

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
    "dual_averaging_step_size",
]

PotentialFn = Callable[[Tensor], Tensor]


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

    Attributes
    ----------
    accept_prob : Tensor
        :math:`\\min(1, a)`, shape ``batch_shape`` (1 for ULA, 0 at a non-finite proposal).
    accepted : Tensor
        Boolean, shape ``batch_shape``.
    log_accept_ratio : Tensor
        :math:`\\log a` (``-inf`` at a non-finite proposal), shape ``batch_shape``.
    step_size : Tensor
        The step size used, broadcastable to ``batch_shape``.
    """

    accept_prob: Tensor
    accepted: Tensor
    log_accept_ratio: Tensor
    step_size: Tensor


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


def _pad_event(t: Tensor, event_dim: int) -> Tensor:
    """Append ``event_dim`` singleton dims so a per-chain tensor broadcasts to positions."""
    return t.reshape(t.shape + (1,) * event_dim)


def _as_step_size(step_size: float | Tensor, like: Tensor) -> Tensor:
    step_size = torch.as_tensor(step_size, dtype=like.dtype, device=like.device)
    if not bool((step_size > 0).all()):
        raise ValueError(f"step_size must be positive, got {step_size.tolist()}")
    return step_size


# -- potential evaluation -----------------------------------------------------------------


def potential_and_grad(
    potential_fn: PotentialFn, position: Tensor, *, keep_graph: bool = False
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
    """
    position = position.detach().requires_grad_(True)
    with torch.enable_grad():
        potential = potential_fn(position)
        if potential.requires_grad:
            (grad,) = torch.autograd.grad(
                potential.sum(), position, retain_graph=keep_graph, allow_unused=True
            )
        else:
            grad = None
    if grad is None:  # the potential does not depend on the position
        grad = torch.zeros_like(position)
    return (potential if keep_graph else potential.detach()), grad.detach()


def langevin_init(
    position: Tensor, potential_fn: PotentialFn, *, keep_graph: bool = False
) -> LangevinState:
    """The state at ``position`` (one potential and gradient evaluation)."""
    potential, grad = potential_and_grad(potential_fn, position, keep_graph=keep_graph)
    return LangevinState(position.detach(), potential, grad)


# -- the pieces of a step -----------------------------------------------------------------


def langevin_proposal(
    state: LangevinState,
    step_size: float | Tensor,
    noise: Tensor | None = None,
    *,
    event_dim: int | None = None,
) -> Tensor:
    r"""The proposal :math:`x - \eta\nabla V(x) + \sqrt{2\eta}\,\xi` (``noise`` is
    :math:`\xi`, drawn from :math:`\mathcal N(0, I)` when not given)."""
    event_dim = _event_dim(state.position, event_dim)
    eta = _pad_event(_as_step_size(step_size, state.position), event_dim)
    if noise is None:
        noise = torch.randn_like(state.position)
    return state.position - eta * state.grad + (2 * eta).sqrt() * noise


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
    state: LangevinState, proposal: LangevinState, eta: Tensor, event_dim: int
) -> Tensor:
    eta_b = _pad_event(eta, event_dim)
    x, x_new = state.position, proposal.position
    forward = _sum_event((x_new - x + eta_b * state.grad) ** 2, event_dim)  # -4eta log q(x'|x)
    backward = _sum_event((x - x_new + eta_b * proposal.grad) ** 2, event_dim)
    v, v_new = state.potential.detach(), proposal.potential.detach()
    log_ratio = v - v_new + (forward - backward) / (4 * eta)
    # a non-finite potential or gradient at the proposal makes log_ratio NaN or +-inf
    # (+inf only from V(x') = -inf, which is no better): reject it
    finite = torch.isfinite(log_ratio) & torch.isfinite(_sum_event(proposal.grad, event_dim))
    return torch.where(finite, log_ratio, -math.inf)


def _select(accepted: Tensor, new: Tensor, old: Tensor, event_dim: int) -> Tensor:
    if accepted.dim() == 0:
        # one chain: a Python branch keeps only the chosen autograd graph alive, so a caller
        # backpropagating the potential never pays for the rejected one
        return new if bool(accepted) else old
    return torch.where(_pad_event(accepted, event_dim), new, old)


def langevin_step(
    state: LangevinState,
    potential_fn: PotentialFn,
    step_size: float | Tensor,
    *,
    mh: bool = True,
    event_dim: int | None = None,
    noise: Tensor | None = None,
    keep_graph: bool = False,
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

    Returns
    -------
    (LangevinState, LangevinInfo)
        A non-finite proposal is always rejected, with ``accept_prob`` 0.
    """
    event_dim = _event_dim(state.position, event_dim)
    eta = _as_step_size(step_size, state.position)
    eta_b = _pad_event(eta, event_dim)
    if noise is None:
        noise = torch.randn_like(state.position)
    new_position = state.position - eta_b * state.grad + (2 * eta_b).sqrt() * noise
    new_potential, new_grad = potential_and_grad(potential_fn, new_position, keep_graph=keep_graph)
    proposal = LangevinState(new_position.detach(), new_potential, new_grad)
    log_ratio = _log_accept_ratio(state, proposal, eta, event_dim)
    if mh:
        accept_prob = log_ratio.clamp(max=0.0).exp()
        log_u = torch.rand_like(accept_prob).log()
        accepted = log_u < log_ratio
    else:
        finite = log_ratio > -math.inf
        accept_prob, accepted = finite.to(log_ratio.dtype), finite
    new_state = LangevinState(
        _select(accepted, proposal.position, state.position, event_dim),
        _select(accepted, proposal.potential, state.potential, 0),
        _select(accepted, proposal.grad, state.grad, event_dim),
    )
    return new_state, LangevinInfo(accept_prob, accepted, log_ratio, eta)


# -- step-size adaptation -----------------------------------------------------------------


class DualAveragingState(NamedTuple):
    r"""State of dual-averaging step-size adaptation (tensors broadcast per chain).

    Attributes
    ----------
    log_step_size : Tensor
        The current iterate :math:`x_t = \log\eta_t` (use it while adapting).
    log_step_size_avg : Tensor
        The weighted average :math:`\bar x_t` (use it once adaptation ends).
    grad_avg : Tensor
        :math:`\bar g_t`, the running average of ``target - accept_prob``.
    t : int
        Number of updates so far.
    prox_center : Tensor
        :math:`\mu = \log(10\,\eta_0)`, the point the iterates are shrunk towards.
    """

    log_step_size: Tensor
    log_step_size_avg: Tensor
    grad_avg: Tensor
    t: int
    prox_center: Tensor


def dual_averaging_init(
    step_size: float | Tensor, *, prox_center: float | Tensor | None = None
) -> DualAveragingState:
    r"""Start adapting from ``step_size`` :math:`\eta_0`; the prox-center defaults to
    :math:`\log(10\eta_0)` as in Hoffman & Gelman (2014) and Pyro's HMC."""
    step_size = torch.as_tensor(step_size, dtype=torch.get_default_dtype())
    if not bool((step_size > 0).all()):
        raise ValueError(f"step_size must be positive, got {step_size.tolist()}")
    log_eta = step_size.log()
    if prox_center is None:
        prox_center = log_eta + math.log(10.0)
    prox_center = torch.as_tensor(prox_center, dtype=log_eta.dtype)
    return DualAveragingState(log_eta, log_eta.clone(), torch.zeros_like(log_eta), 0, prox_center)


def dual_averaging_update(
    state: DualAveragingState,
    accept_prob: float | Tensor,
    target: float,
    *,
    t0: float = 10.0,
    kappa: float = 0.75,
    gamma: float = 0.05,
    max_t: int | None = None,
) -> DualAveragingState:
    r"""One dual-averaging update with statistic :math:`g_t = \delta - \alpha_t`,

    .. math::

        \bar g_t = \Bigl(1 - \frac{1}{t + t_0}\Bigr)\bar g_{t-1} + \frac{g_t}{t + t_0},
        \quad x_t = \mu - \frac{\sqrt t}{\gamma}\bar g_t, \quad
        \bar x_t = (1 - t^{-\kappa})\bar x_{t-1} + t^{-\kappa} x_t .

    The defaults are Hoffman & Gelman's (and :class:`pyro.ops.dual_averaging.DualAveraging`'s).

    Parameters
    ----------
    state : DualAveragingState
    accept_prob : float or Tensor
        The latest acceptance probability :math:`\alpha_t` (per chain, or averaged).
    target : float
        Target acceptance :math:`\delta` (0.574 is optimal for MALA).
    max_t : int, optional
        Cap the iteration counter used in the recursion. Plain dual averaging converges
        for a *fixed* target distribution and becomes ever slower to react (its step
        shrinks like :math:`t^{-1/2}`); a cap keeps it a fixed-gain tracker with a memory
        of about ``max_t`` steps, for targets that keep changing (a decoder in training).
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target acceptance must be in (0, 1), got {target}")
    accept_prob = torch.as_tensor(accept_prob, dtype=state.grad_avg.dtype)
    accept_prob = accept_prob.to(state.grad_avg.device)
    t = state.t + 1
    t_eff = t if max_t is None else min(t, max_t)
    g = target - accept_prob
    w = 1.0 / (t_eff + t0)
    grad_avg = (1 - w) * state.grad_avg + w * g
    log_step_size = state.prox_center - math.sqrt(t_eff) / gamma * grad_avg
    weight = t_eff ** (-kappa)
    log_step_size_avg = (1 - weight) * state.log_step_size_avg + weight * log_step_size
    return DualAveragingState(log_step_size, log_step_size_avg, grad_avg, t, state.prox_center)


def dual_averaging_step_size(state: DualAveragingState, *, final: bool = False) -> Tensor:
    """The step size to use now (``final=False``: :math:`e^{x_t}`) or after adaptation
    (``final=True``: the averaged :math:`e^{\\bar x_t}`)."""
    return (state.log_step_size_avg if final else state.log_step_size).exp()
