r"""The Metropolis-Hastings accept/reject decision, shared by MALA and HMC transitions.

Given :math:`\log a` (the log acceptance ratio of a proposal), accept with probability
:math:`\min(1, a)`: draw :math:`u \sim U(0, 1)` and accept iff :math:`\log u < \log a`.
A NaN ratio (a non-finite potential or gradient at the proposal) is a rejection, as in
BlackJAX (``jnp.where(jnp.isnan(delta), -jnp.inf, delta)``); so is :math:`+\infty` from
:math:`V(x') = -\infty`, which is no better.

**One chain** (a 0-d ratio) is decided in Python: the ratio is read once (on CUDA, the
transition's one host synchronisation, which a Python branch on the decision needs
anyway) and the acceptance probability, the decision and all later bookkeeping (step-size
adaptation, statistics) are Python floats, avoiding a dozen 0-d tensor operations per
step. **Many chains** (a ratio with a batch shape) stay tensors on their device.

The uniform comes from ``generator`` when given (on the generator's device), else from
the global CPU stream (one chain) or the ratio's device (many chains); a distributed
caller passes one generator seeded alike on every rank so that all ranks take the same
decision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["finite_log_ratio", "mh_accept", "select"]


def finite_log_ratio(log_ratio: Tensor, *finite_also: Tensor) -> Tensor:
    """``log_ratio`` with NaN and :math:`\\pm\\infty` (and entries where any of
    ``finite_also`` is non-finite, per chain) replaced by :math:`-\\infty`."""
    finite = torch.isfinite(log_ratio)
    for t in finite_also:
        finite = finite & torch.isfinite(t)
    return torch.where(finite, log_ratio, -math.inf)


def _uniform_like(like: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is not None:
        return torch.rand(like.shape, generator=generator, device=generator.device).to(like)
    return torch.rand_like(like)


def mh_accept(
    log_ratio: float | Tensor, *, mh: bool = True, generator: torch.Generator | None = None
) -> tuple[float, bool] | tuple[Tensor, Tensor]:
    r"""``(accept_prob, accepted)`` for the log ratio(s) :math:`\log a` (non-finite
    entries must already be :math:`-\infty`, see :func:`finite_log_ratio`).

    ``mh=False`` (unadjusted) accepts every finite proposal with probability 1. A float
    or 0-d ``log_ratio`` gives Python ``(float, bool)``; a batched one tensors of its
    shape.
    """
    if isinstance(log_ratio, float) or log_ratio.dim() == 0:
        value = float(log_ratio)  # the one host sync of a single-chain transition
        if not mh:
            return (1.0, True) if value > -math.inf else (0.0, False)
        accept_prob = math.exp(min(value, 0.0))
        if generator is not None:
            u = float(torch.rand((), generator=generator, device=generator.device))
        else:
            u = float(torch.rand(()))
        return accept_prob, u < accept_prob
    if not mh:
        finite = log_ratio > -math.inf
        return finite.to(log_ratio.dtype), finite
    accept_prob = log_ratio.clamp(max=0.0).exp()
    accepted = _uniform_like(accept_prob, generator).log() < log_ratio
    return accept_prob, accepted


def select(accepted: bool | Tensor, new: Tensor, old: Tensor, event_dim: int) -> Tensor:
    """``new`` where accepted else ``old``; per chain for a batched decision.

    One chain (a Python bool) branches in Python: only the chosen tensor and its autograd
    graph stay alive, so a caller backpropagating the potential never pays for the
    rejected one.
    """
    if isinstance(accepted, bool):
        return new if accepted else old
    if accepted.dim() == 0:
        return new if bool(accepted) else old
    return torch.where(accepted.reshape(accepted.shape + (1,) * event_dim), new, old)
