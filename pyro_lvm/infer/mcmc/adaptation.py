r"""Step-size adaptation: dual averaging and an initial step-size search.

**Dual averaging** (Nesterov 2009, in the form of Hoffman & Gelman 2014, Algorithm 6; the
recursion of :class:`pyro.ops.dual_averaging.DualAveraging` and BlackJAX's
``dual_averaging``) drives :math:`\log\eta` towards a target acceptance :math:`\delta`
with the statistic :math:`g_t = \delta - \alpha_t`. It is written BlackJAX-style as
``init / update / final`` pure functions of a :class:`DualAveragingState`: with Python
floats for one chain (no device operation, no host sync per transition) or with tensors,
per chain, for batched samplers (AIS, test-time refinement). :func:`dual_averaging_step`
is the one update-then-read loop body that every sampler in :mod:`pyro_lvm.infer` uses
(the ALD kernel, ``DLGM``, ``refine_latents``, AIS).

**Step-size search** (:func:`find_step_size`, Hoffman & Gelman 2014, Algorithm 4; Pyro's
``HMC._find_reasonable_step_size``, BlackJAX's ``find_reasonable_step_size``): double or
halve :math:`\eta` until one proposal's acceptance probability crosses the target. It only
*evaluates* proposals from a fixed state with fixed noise, through a caller-supplied
``log_accept(eta)``; it never advances the chain.

References
----------
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
    "check_step_options",
    "DualAveragingState",
    "dual_averaging_init",
    "dual_averaging_update",
    "dual_averaging_final",
    "dual_averaging_step_size",
    "dual_averaging_step",
    "find_step_size",
]

Number = float | Tensor


class DualAveragingState(NamedTuple):
    r"""State of dual-averaging step-size adaptation (Python floats for one chain, or
    tensors broadcast per chain).

    Attributes
    ----------
    log_step_size : float or Tensor
        The current iterate :math:`x_t = \log\eta_t` (use it while adapting).
    log_step_size_avg : float or Tensor
        The weighted average :math:`\bar x_t` (use it once adaptation ends).
    grad_avg : float or Tensor
        :math:`\bar g_t`, the running average of ``target - accept_prob``.
    t : int
        Number of updates so far.
    prox_center : float or Tensor
        :math:`\mu = \log(10\,\eta_0)`, the point the iterates are shrunk towards.
    """

    log_step_size: Number
    log_step_size_avg: Number
    grad_avg: Number
    t: int
    prox_center: Number


def _exp(x: Number) -> Number:
    return math.exp(x) if isinstance(x, float) else x.exp()


def check_step_options(*, num_steps: int, step_size: float, target_accept_prob: float) -> None:
    """One-line errors for impossible Langevin options (a trainer's ``__init__``)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    if not 0 < target_accept_prob < 1:
        raise ValueError(f"target_accept_prob must be in (0, 1), got {target_accept_prob}")


def dual_averaging_init(
    step_size: Number, *, prox_center: Number | None = None
) -> DualAveragingState:
    r"""Start adapting from ``step_size`` :math:`\eta_0`; the prox-center defaults to
    :math:`\log(10\eta_0)` as in Hoffman & Gelman (2014) and Pyro's HMC. A Python number
    gives a float state, a tensor a tensor state of its shape."""
    if isinstance(step_size, (int, float)):
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        log_eta = math.log(step_size)
        center = log_eta + math.log(10.0) if prox_center is None else float(prox_center)
        return DualAveragingState(log_eta, log_eta, 0.0, 0, center)
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
    accept_prob: Number,
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
        The samplers call this knob ``adapt_window``.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target acceptance must be in (0, 1), got {target}")
    if isinstance(state.grad_avg, Tensor):
        accept_prob = torch.as_tensor(accept_prob, dtype=state.grad_avg.dtype)
        accept_prob = accept_prob.to(state.grad_avg.device)
    elif isinstance(accept_prob, Tensor):
        accept_prob = float(accept_prob)
    t = state.t + 1
    t_eff = t if max_t is None else min(t, max_t)
    g = target - accept_prob
    w = 1.0 / (t_eff + t0)
    grad_avg = (1 - w) * state.grad_avg + w * g
    log_step_size = state.prox_center - math.sqrt(t_eff) / gamma * grad_avg
    weight = t_eff ** (-kappa)
    log_step_size_avg = (1 - weight) * state.log_step_size_avg + weight * log_step_size
    return DualAveragingState(log_step_size, log_step_size_avg, grad_avg, t, state.prox_center)


def dual_averaging_step_size(state: DualAveragingState, *, final: bool = False) -> Number:
    """The step size to use now (``final=False``: :math:`e^{x_t}`) or after adaptation
    (``final=True``: the averaged :math:`e^{\\bar x_t}`)."""
    return _exp(state.log_step_size_avg if final else state.log_step_size)


def dual_averaging_final(state: DualAveragingState) -> Number:
    """The step size once adaptation ends, :math:`e^{\\bar x_t}`."""
    return dual_averaging_step_size(state, final=True)


def dual_averaging_step(
    state: DualAveragingState,
    accept_prob: Number,
    target: float,
    *,
    max_t: int | None = None,
    final: bool = False,
) -> tuple[DualAveragingState, Number]:
    """Update with the latest ``accept_prob`` and return the step size to use next: the
    iterate while adapting, the average when ``final`` (the last adaptation step)."""
    state = dual_averaging_update(state, accept_prob, target, max_t=max_t)
    return state, dual_averaging_step_size(state, final=final)


def find_step_size(
    log_accept: Callable[[float], float],
    target_accept_prob: float,
    *,
    initial: float = 1e-3,
    max_doublings: int = 60,
) -> float:
    r"""Double or halve :math:`\eta` from ``initial`` until the acceptance of one proposal
    crosses ``target_accept_prob`` (Hoffman & Gelman 2014, Algorithm 4).

    Parameters
    ----------
    log_accept : callable
        ``log_accept(eta) -> float``: :math:`\log a` of the proposal with step ``eta``
        from a fixed state and fixed noise (it must not change the chain).
    target_accept_prob : float
        Where to stop: the last step size on the accepting side of the target.
    """
    log_target = math.log(target_accept_prob)
    eta = float(initial)
    direction = 1.0 if log_accept(eta) > log_target else -1.0
    for _ in range(max_doublings):
        new_eta = eta * 2.0**direction
        if (log_accept(new_eta) > log_target) != (direction > 0):
            return eta if direction > 0 else new_eta
        eta = new_eta
    return eta
