r"""Annealed importance sampling (AIS) estimates of :math:`\log p(x)` per datapoint.

For each datapoint :math:`x_i`, anneal from the prior to the posterior through the
geometric path

.. math::

    \pi_t(z) \propto p(z)\, p(x_i \mid z)^{\beta_t}, \qquad
    0 = \beta_0 < \beta_1 < \dots < \beta_T = 1 .

Draw :math:`z_0 \sim p(z)`; for :math:`t = 1..T` add
:math:`(\beta_t - \beta_{t-1}) \log p(x_i \mid z_{t-1})` to the log weight, then move
:math:`z_{t-1} \to z_t` with a MALA (or HMC) transition that leaves :math:`\pi_t` invariant. The
weight :math:`w` is an unbiased estimate of :math:`p(x_i)` (Neal 2001), so with :math:`C`
independent chains

.. math::

    \hat L(x_i) = \log \frac1C \sum_{c=1}^C w^{(c)}, \qquad
    \mathbb E[\hat L(x_i)] \le \log p(x_i)

is a stochastic lower bound (Jensen), tight as :math:`T \to \infty` (the variance of
:math:`\log w` vanishes). ``num_steps=1`` is plain importance sampling from the prior.
AIS needs no encoder, so it judges decoders trained by different algorithms (VAE, LAE,
DLGM, PPCA) on equal terms (Wu et al. 2017).

**Step-size adaptation that keeps the weights valid.** A transition must leave
:math:`\pi_t` invariant *given everything it depends on*. A step size computed from a
chain's own history is correlated with its current state and breaks that (a small bias
of unknown sign). Here the step size of datapoint :math:`i` at step :math:`t` is driven
(dual averaging towards ``target_accept_prob``, with a bounded memory so it tracks the
changing :math:`\beta_t`) only by the acceptance probabilities of ``num_tuning_chains``
extra *tuning chains* of the same datapoint at steps :math:`< t`. The tuning chains'
weights are discarded; the estimator chains are independent of them, so conditionally on
the tuning chains they run AIS with a fixed step-size schedule and their weights are
exactly unbiased.

**Cost.** One model evaluation per annealing step and chain: one forward pass, one
backward pass through the likelihood (the decoder) for :math:`\nabla\log p(x \mid z)` and
one through the prior terms alone for :math:`\nabla\log p(z)`; the potential's gradient
is assembled from the two, :math:`\nabla V = -(\nabla\log p(z) + \beta\nabla\log
p(x \mid z))`, so the decoder is never differentiated twice. The cached potential and
gradient are re-targeted to each new :math:`\beta_t` exactly, without re-evaluation.
``num_steps * (num_chains + num_tuning_chains)`` decoder passes per datapoint.

References
----------
Neal (2001), "Annealed importance sampling", Statistics and Computing 11.
Wu, Burda, Salakhutdinov, Grosse (2017), "On the quantitative analysis of decoder-based
generative models", ICLR.
Grosse, Maddison, Salakhutdinov (2013), "Annealing between distributions by averaging
moments", NeurIPS (the sigmoid schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from pyro_lvm.infer.mcmc.adaptation import dual_averaging_init, dual_averaging_step
from pyro_lvm.infer.mcmc.hmc import hmc_step
from pyro_lvm.infer.mcmc.langevin import (
    LangevinState,
    langevin_init,
    langevin_step,
)
from pyro_lvm.infer.sites import find_latents, log_densities, sample_prior

__all__ = ["AISResult", "ais_schedule", "annealed_importance_sampling", "ais_log_likelihood"]


class AISResult(NamedTuple):
    """Output of :func:`annealed_importance_sampling` (tensors over datapoints ``B``).

    Attributes
    ----------
    log_likelihood : Tensor
        :math:`\\hat L(x_i)`, shape ``(B,)``, nats.
    log_weights : Tensor
        Log AIS weights of the estimator chains, shape ``(num_chains, B)``.
    accept_rate : Tensor
        Mean MH acceptance probability of the estimator chains over the run, ``(B,)``.
    step_size : Tensor
        Step size used at the last transition, ``(B,)``.
    """

    log_likelihood: torch.Tensor
    log_weights: torch.Tensor
    accept_rate: torch.Tensor
    step_size: torch.Tensor


def ais_schedule(num_steps: int, schedule: str = "sigmoid", *, delta: float = 4.0) -> torch.Tensor:
    r"""Inverse temperatures :math:`\beta_0 = 0 < \dots < \beta_T = 1`, shape ``(T + 1,)``.

    ``"linear"``: :math:`\beta_t = t/T`. ``"sigmoid"`` (Grosse et al. 2013; Wu et al.
    2017): :math:`\tilde\beta_t = \sigma(\delta(2t/T - 1))` rescaled to :math:`[0, 1]`,
    which spends more steps near both ends, where the log weights change fastest.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if schedule == "linear":
        betas = t
    elif schedule == "sigmoid":
        s = torch.sigmoid(delta * (2 * t - 1))
        betas = (s - s[0]) / (s[-1] - s[0])
    else:
        raise ValueError(f"unknown AIS schedule {schedule!r}; choose 'sigmoid' or 'linear'")
    betas[0], betas[-1] = 0.0, 1.0
    return betas


def _check(num_chains, num_tuning_chains, step_size, target_accept_prob, adapt_step_size):
    if num_chains < 1:
        raise ValueError(f"num_chains must be >= 1, got {num_chains}")
    if not bool((torch.as_tensor(step_size) > 0).all()):
        raise ValueError(f"step_size must be positive, got {step_size}")
    if not 0 < target_accept_prob < 1:
        raise ValueError(f"target_accept_prob must be in (0, 1), got {target_accept_prob}")
    if adapt_step_size and num_tuning_chains < 1:
        raise ValueError(
            "adapt_step_size=True needs num_tuning_chains >= 1 (adapting on the estimator "
            "chains themselves would bias the weights); pass adapt_step_size=False instead"
        )


def _grad_or_zeros(output: torch.Tensor, position: torch.Tensor, retain: bool) -> torch.Tensor:
    if not output.requires_grad:
        return torch.zeros_like(position)
    (grad,) = torch.autograd.grad(output.sum(), position, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(position) if grad is None else grad


def annealed_potential(
    model: Callable, spec, beta: float, evaluated: dict[str, torch.Tensor], *args, **kwargs
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The potential :math:`V_\beta(z) = -(\log p(z) + \beta \log p(x \mid z))` of the
    annealing distribution :math:`\pi_\beta`, per chain and datapoint (shape ``(C, B)``).

    Each call records ``evaluated["log_lik"]`` (:math:`\log p(x \mid z)`) and
    ``evaluated["grad"]`` (its gradient in ``z``). The gradients of the two terms are
    taken separately, the likelihood's through the decoder once, and the returned
    potential carries :math:`\nabla V_\beta` as its gradient through a term that is zero
    in value, so differentiating it (as :func:`~pyro_lvm.infer.mcmc.langevin.potential_and_grad`
    does) costs one multiply instead of a second pass through the decoder.
    """

    def potential(position: torch.Tensor) -> torch.Tensor:
        log_prior, log_lik = log_densities(model, spec, position, *args, **kwargs)
        grad_lik = _grad_or_zeros(log_lik, position, retain=True)
        grad_prior = _grad_or_zeros(log_prior, position, retain=False)
        evaluated["log_lik"], evaluated["grad"] = log_lik.detach(), grad_lik.detach()
        value = -(log_prior + beta * log_lik).detach()
        grad = -(grad_prior + beta * grad_lik).detach()
        # (position - position.detach()) is exactly zero: the value stays bit-identical
        return value + ((position - position.detach()) * grad).sum(-1)

    return potential


def annealed_importance_sampling(
    model: Callable,
    *args,
    num_steps: int = 1000,
    num_chains: int = 16,
    step_size: float | torch.Tensor = 0.1,
    schedule: str | Sequence[float] | torch.Tensor = "sigmoid",
    latent_site: str | Sequence[str] | None = None,
    mh: bool = True,
    adapt_step_size: bool = True,
    target_accept_prob: float = 0.574,
    num_tuning_chains: int = 2,
    adapt_window: int = 50,
    num_leapfrog: int = 1,
    max_plate_nesting: int = 1,
    **kwargs,
) -> AISResult:
    r"""AIS from the prior to the posterior of every datapoint; see the module docstring.

    Parameters
    ----------
    model : callable
        Pyro model with continuous, real-valued latent sites inside a data plate (the
        outermost plate, ``dim=-max_plate_nesting``) and observed sites; e.g. ``vae.model``.
    *args, **kwargs
        Passed to ``model`` (typically the batch ``x`` of shape ``(B, D)``).
    num_steps : int
        Number of annealing distributions :math:`T` (``num_steps - 1`` transitions).
    num_chains : int
        Independent estimator chains per datapoint :math:`C`.
    step_size : float or Tensor
        MALA step size :math:`\eta` (proposal variance :math:`2\eta`): a float, or one per
        datapoint (shape ``(B,)``). With adaptation, the initial value.
    schedule : str or sequence
        ``"sigmoid"``, ``"linear"``, or explicit increasing :math:`\beta` values from 0 to 1
        (which then replace ``num_steps``).
    latent_site : str or sequence of str, optional
        The model's latent sites (default: all unobserved sites).
    mh : bool
        Metropolis-Hastings correction. ``False`` (ULA) is cheaper but the transitions no
        longer leave :math:`\pi_t` invariant, so the estimate is no longer a valid bound.
    adapt_step_size : bool
        Per-datapoint adaptation from tuning chains (see the module docstring).
    target_accept_prob : float
        Target acceptance of the adaptation (0.574 is optimal for MALA).
    num_tuning_chains : int
        Extra chains per datapoint that drive the adaptation; their weights are discarded.
    adapt_window : int
        Dual-averaging iteration cap (``max_t``): memory of about this many steps.
    num_leapfrog : int
        1 (default): MALA transitions. More: HMC transitions with this many leapfrog steps
        of size :math:`\sqrt{2\eta}` (Wu et al. 2017 use 10); each costs ``num_leapfrog``
        gradient evaluations.
    max_plate_nesting : int
        Plates in the model; the chain plate goes left of them.

    Returns
    -------
    AISResult
    """
    _check(num_chains, num_tuning_chains, step_size, target_accept_prob, adapt_step_size)
    if num_leapfrog < 1:
        raise ValueError(f"num_leapfrog must be >= 1, got {num_leapfrog}")
    if isinstance(schedule, str):
        betas = ais_schedule(num_steps, schedule)
    else:
        betas = torch.as_tensor(schedule, dtype=torch.float64)
        if betas.dim() != 1 or betas[0] != 0 or betas[-1] != 1 or (betas.diff() < 0).any():
            raise ValueError("an explicit AIS schedule must increase from 0 to 1")
    betas = betas.tolist()
    spec = find_latents(
        model, *args, latent_site=latent_site, max_plate_nesting=max_plate_nesting, **kwargs
    )
    num_tune = num_tuning_chains if adapt_step_size else 0
    total = num_chains + num_tune
    z = sample_prior(model, spec, total, *args, **kwargs)
    batch = spec.batch_size
    eta = torch.as_tensor(step_size, dtype=z.dtype, device=z.device).expand(batch).clone()
    adapt = dual_averaging_init(eta) if adapt_step_size else None

    # each evaluation also records log p(x | z) and its gradient: the weight increments
    # need the value at the current state, and moving to the next temperature then
    # re-targets the cached potential and gradient exactly,
    # V_t = V_{t-1} - (beta_t - beta_{t-1}) log p(x | z), without re-evaluating
    evaluated: dict[str, torch.Tensor] = {}

    def make_potential(beta: float):
        return annealed_potential(model, spec, beta, evaluated, *args, **kwargs)

    state = langevin_init(z, make_potential(0.0))
    log_lik, grad_log_lik = evaluated["log_lik"], evaluated["grad"]
    log_w = z.new_zeros(total, batch)
    accept_sum = z.new_zeros(total, batch)
    num_transitions = len(betas) - 2
    for t in range(1, len(betas)):
        d_beta = betas[t] - betas[t - 1]
        log_w = log_w + d_beta * log_lik
        if t == len(betas) - 1:
            break
        state = LangevinState(
            state.position, state.potential - d_beta * log_lik, state.grad - d_beta * grad_log_lik
        )
        step_sizes = eta.expand(total, batch)
        if num_leapfrog == 1:
            state, info = langevin_step(
                state, make_potential(betas[t]), step_sizes, mh=mh, event_dim=1
            )
        else:
            state, info = hmc_step(
                state, make_potential(betas[t]), step_sizes, num_leapfrog, mh=mh
            )
        log_lik = torch.where(info.accepted, evaluated["log_lik"], log_lik)
        grad_log_lik = torch.where(info.accepted.unsqueeze(-1), evaluated["grad"], grad_log_lik)
        accept_sum = accept_sum + info.accept_prob
        if adapt is not None:
            # tuning chains only, past steps only: the estimator chains stay exact AIS
            adapt, eta = dual_averaging_step(
                adapt, info.accept_prob[:num_tune].mean(0), target_accept_prob, max_t=adapt_window
            )
    log_w = log_w[num_tune:]
    log_lik = log_w.logsumexp(0) - math.log(num_chains)
    accept_rate = accept_sum[num_tune:].mean(0) / max(num_transitions, 1)
    return AISResult(log_lik, log_w, accept_rate, eta)


def ais_log_likelihood(
    model: Callable,
    *args,
    num_steps: int = 1000,
    num_chains: int = 16,
    step_size: float | torch.Tensor = 0.1,
    schedule: str | Sequence[float] | torch.Tensor = "sigmoid",
    latent_site: str | Sequence[str] | None = None,
    mh: bool = True,
    adapt_step_size: bool = True,
    target_accept_prob: float = 0.574,
    num_tuning_chains: int = 2,
    num_leapfrog: int = 1,
    max_plate_nesting: int = 1,
    **kwargs,
) -> torch.Tensor:
    r"""Per-datapoint AIS estimates of :math:`\log p(x_i)` in nats, shape ``(B,)``.

    A stochastic lower bound, tight as ``num_steps`` grows (Wu et al. 2017). See
    :func:`annealed_importance_sampling` for the arguments and diagnostics.

    Examples
    --------
    >>> ll = ais_log_likelihood(vae.model, x, num_steps=500)  # doctest: +SKIP
    """
    return annealed_importance_sampling(
        model,
        *args,
        num_steps=num_steps,
        num_chains=num_chains,
        step_size=step_size,
        schedule=schedule,
        latent_site=latent_site,
        mh=mh,
        adapt_step_size=adapt_step_size,
        target_accept_prob=target_accept_prob,
        num_tuning_chains=num_tuning_chains,
        num_leapfrog=num_leapfrog,
        max_plate_nesting=max_plate_nesting,
        **kwargs,
    ).log_likelihood
