r"""Test-time inference: per-datapoint MALA refinement and proposals fitted to it.

An encoder gives a point :math:`z^{(0)}_i` per datapoint (a VAE's mean, an LAE's
:math:`\Phi g(x_i)`, a DLGM's :math:`q` mean). :func:`refine_latents` runs independent
MALA chains on each posterior :math:`p(z \mid x_i) \propto p(z)\,p(x_i \mid z)` from
there, with per-datapoint step sizes adapted by dual averaging during a warmup and then
frozen (so the post-warmup chain is an exact MALA chain).

:func:`fit_langevin_proposal` turns those short chains into a Gaussian proposal per
datapoint,

.. math::

    q(z \mid x_i) = \mathcal N\bigl(\bar z_i,\ \mathrm{diag}\,\max(\lambda s_i,
    s_{\min})^2\bigr),

with :math:`\bar z_i, s_i` the mean and standard deviation of the post-warmup states
(pooled over chains), an inflation :math:`\lambda \ge 1` (a proposal narrower than the
posterior gives high-variance weights; a wider one only costs a little) and a floor.
Any proposal with full support gives a valid importance-weighted bound, also one built
from the data and from random chains: given the fitted :math:`q`, the importance weights
are unbiased for :math:`p(x_i)`, so :math:`\mathbb E\,\hat L_K \le \log p(x_i)`. This is
the ``test_nll`` protocol for models without a trained variational posterior (LAE) or
whose sampler refines it (DLGM): ``iwae_log_likelihood(model, proposal, x)``.

:class:`LangevinProposalGuide` wraps this as an ordinary guide ``guide(x)`` that fits the
proposal once per batch (cached) and can be handed to any evaluator.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from pyro_lvm.infer.mcmc.adaptation import dual_averaging_init, dual_averaging_step
from pyro_lvm.infer.mcmc.langevin import langevin_init, langevin_step
from pyro_lvm.infer.sites import ModelSites, check_vectorized, find_latents, log_densities

__all__ = [
    "RefineInfo",
    "refine_latents",
    "GaussianProposal",
    "fit_langevin_proposal",
    "LangevinProposalGuide",
]


class RefineInfo(NamedTuple):
    """Diagnostics of :func:`refine_latents` (tensors over datapoints ``B``).

    Attributes
    ----------
    accept_rate : Tensor
        Mean acceptance probability after warmup (all steps if there is no warmup), ``(B,)``.
    step_size : Tensor
        Step size used after warmup, ``(B,)``.
    samples : Tensor or None
        Post-warmup states, ``(num_steps - num_warmup, C, B, latent_size)``, if requested.
    """

    accept_rate: torch.Tensor
    step_size: torch.Tensor
    samples: torch.Tensor | None


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not bool((torch.as_tensor(value) > 0).all()):
            raise ValueError(f"{name} must be positive, got {value}")


def refine_latents(
    model: Callable,
    x: torch.Tensor,
    z_init: torch.Tensor,
    num_steps: int,
    *,
    step_size: float | torch.Tensor = 0.01,
    num_warmup: int | None = None,
    mh: bool = True,
    adapt_step_size: bool = True,
    target_accept_prob: float = 0.574,
    latent_site: str | Sequence[str] | None = None,
    max_plate_nesting: int = 1,
    return_samples: bool = False,
) -> tuple[torch.Tensor, RefineInfo]:
    r"""Run per-datapoint MALA chains on :math:`p(z \mid x_i)` starting at ``z_init``.

    Parameters
    ----------
    model : callable
        Pyro model ``model(x)`` with real-valued latent site(s) inside a data plate.
    x : Tensor
        Data batch, ``(B, ...)``.
    z_init : Tensor
        Start, ``(B, latent_size)`` or ``(C, B, latent_size)`` for ``C`` chains per
        datapoint (latent sites packed in trace order; for one site ``"z"`` of shape
        ``(B, Z)`` just its value).
    num_steps : int
        MALA transitions (including warmup).
    step_size : float or Tensor
        Initial step size :math:`\eta` (proposal variance :math:`2\eta`), scalar or ``(B,)``.
    num_warmup : int, optional
        Adaptation steps (default ``num_steps // 2`` with adaptation, else 0).
    mh, adapt_step_size, target_accept_prob
        MALA (``mh=True``) or ULA; dual-averaging adaptation per datapoint during warmup.

    Returns
    -------
    (z, RefineInfo)
        The final states, shaped like ``z_init``, and diagnostics.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    _check_positive(step_size=step_size)
    if num_warmup is None:
        num_warmup = num_steps // 2 if adapt_step_size else 0
    if not 0 <= num_warmup < num_steps:
        raise ValueError(f"num_warmup must be in [0, num_steps), got {num_warmup}")
    spec = find_latents(model, x, latent_site=latent_site, max_plate_nesting=max_plate_nesting)
    # a model written for one draw (.expand to the batch, BatchNorm) gets one call per chain
    spec = check_vectorized(model, spec, x)
    squeeze = z_init.dim() == 2
    z = z_init.detach().unsqueeze(0) if squeeze else z_init.detach()
    if z.dim() != 3 or z.shape[1:] != (spec.batch_size, spec.size):
        raise ValueError(
            f"z_init must have shape ({spec.batch_size}, {spec.size}) or (chains, "
            f"{spec.batch_size}, {spec.size}) for this model and batch, got "
            f"{tuple(z_init.shape)}"
        )
    num_chains, batch = z.shape[0], spec.batch_size
    eta = torch.as_tensor(step_size, dtype=z.dtype, device=z.device).expand(batch).clone()
    adapt = dual_averaging_init(eta) if adapt_step_size and num_warmup > 0 else None

    def potential(position: torch.Tensor) -> torch.Tensor:
        log_prior, log_lik = log_densities(model, spec, position, x)
        return -(log_prior + log_lik)

    state = langevin_init(z, potential)
    samples, accept_sum = [], z.new_zeros(num_chains, batch)
    for t in range(num_steps):
        state, info = langevin_step(
            state, potential, eta.expand(num_chains, batch), mh=mh, event_dim=1
        )
        if t < num_warmup:
            if adapt is not None:
                adapt, eta = dual_averaging_step(
                    adapt, info.accept_prob.mean(0), target_accept_prob, final=t == num_warmup - 1
                )
                eta = eta.to(z)
            continue
        accept_sum = accept_sum + info.accept_prob
        if return_samples:
            samples.append(state.position)
    accept_rate = accept_sum.mean(0) / (num_steps - num_warmup)
    z_out = state.position.squeeze(0) if squeeze else state.position
    stacked = torch.stack(samples) if return_samples else None
    return z_out, RefineInfo(accept_rate, eta, stacked)


class GaussianProposal:
    r"""A guide proposing every latent site from a fixed per-datapoint diagonal Gaussian.

    ``proposal(x)`` samples inside a data plate over the ``B`` rows it was fitted to, so it
    works with :func:`pyro_lvm.infer.iwae_log_likelihood` and vectorized particle plates.

    Parameters
    ----------
    spec : ModelSites
        The model's latent sites (from :func:`pyro_lvm.infer.sites.find_latents`).
    loc, scale : Tensor
        Packed ``(B, latent_size)`` mean and standard deviation.
    """

    def __init__(self, spec: ModelSites, loc: torch.Tensor, scale: torch.Tensor):
        if loc.shape != (spec.batch_size, spec.size) or scale.shape != loc.shape:
            raise ValueError(
                f"loc and scale must have shape ({spec.batch_size}, {spec.size}), got "
                f"{tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        _check_positive(scale=scale)
        self.spec, self.loc, self.scale = spec, loc.detach(), scale.detach()

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> None:
        if x.shape[0] != self.spec.batch_size:
            raise ValueError(
                f"this proposal was fitted to {self.spec.batch_size} datapoints, got a batch "
                f"of {x.shape[0]}; fit one per batch (or use LangevinProposalGuide)"
            )
        start = 0
        with pyro.plate("data", self.spec.batch_size, dim=-self.spec.max_plate_nesting):
            for name, shape in zip(self.spec.names, self.spec.shapes):
                n = math.prod(shape)
                loc = self.loc[:, start : start + n].reshape((-1,) + shape)
                scale = self.scale[:, start : start + n].reshape((-1,) + shape)
                pyro.sample(name, dist.Normal(loc, scale).to_event(len(shape)))
                start += n


def fit_langevin_proposal(
    model: Callable,
    x: torch.Tensor,
    z_init: torch.Tensor,
    num_steps: int,
    *,
    num_chains: int = 8,
    step_size: float | torch.Tensor = 0.01,
    num_warmup: int | None = None,
    scale_inflation: float = 1.2,
    min_scale: float = 1e-3,
    mh: bool = True,
    adapt_step_size: bool = True,
    target_accept_prob: float = 0.574,
    latent_site: str | Sequence[str] | None = None,
    max_plate_nesting: int = 1,
) -> GaussianProposal:
    r"""Fit :math:`q(z \mid x_i)` to short MALA chains started at ``z_init``.

    Runs ``num_chains`` chains per datapoint with :func:`refine_latents` and returns a
    :class:`GaussianProposal` with the pooled post-warmup mean and standard deviation
    (times ``scale_inflation``, floored at ``min_scale``); see the module docstring.
    ``num_steps`` must leave at least two post-warmup states per chain.
    """
    if num_chains < 1:
        raise ValueError(f"num_chains must be >= 1, got {num_chains}")
    if scale_inflation < 1:
        raise ValueError(f"scale_inflation must be >= 1, got {scale_inflation}")
    _check_positive(min_scale=min_scale)
    z0 = z_init.detach()
    if z0.dim() == 2:
        z0 = z0.expand(num_chains, *z0.shape)
    _, info = refine_latents(
        model,
        x,
        z0,
        num_steps,
        step_size=step_size,
        num_warmup=num_warmup,
        mh=mh,
        adapt_step_size=adapt_step_size,
        target_accept_prob=target_accept_prob,
        latent_site=latent_site,
        max_plate_nesting=max_plate_nesting,
        return_samples=True,
    )
    samples = info.samples.flatten(0, 1)  # (S * C, B, latent_size)
    if samples.shape[0] < 2:
        raise ValueError(
            "fit_langevin_proposal needs at least 2 post-warmup states; raise num_steps"
        )
    loc = samples.mean(0)
    scale = (samples.std(0) * scale_inflation).clamp(min=min_scale)
    spec = find_latents(model, x, latent_site=latent_site, max_plate_nesting=max_plate_nesting)
    return GaussianProposal(spec, loc, scale)


class LangevinProposalGuide:
    r"""``guide(x)``: a :class:`GaussianProposal` fitted to MALA chains from ``init(x)``.

    The fit runs once per batch object ``x`` (cached by identity, so the repeated calls of
    a chunked importance-sampling evaluator reuse it) with gradients enabled and hidden
    from any outer Pyro handler, so the guide also works inside ``torch.no_grad()``.

    Parameters
    ----------
    model : callable
        Pyro model ``model(x)``.
    init : callable
        ``init(x) -> z_init`` of shape ``(B, latent_size)``, e.g. ``vae.encode``.
    num_steps : int
        MALA transitions per chain (half of them warmup by default).
    **fit_kwargs
        Passed to :func:`fit_langevin_proposal` (``num_chains``, ``step_size``, ...).
    """

    def __init__(self, model: Callable, init: Callable, num_steps: int, **fit_kwargs):
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2 to fit a proposal, got {num_steps}")
        self.model, self.init, self.num_steps, self.fit_kwargs = model, init, num_steps, fit_kwargs
        self._x_ref, self._proposal = None, None

    def proposal(self, x: torch.Tensor) -> GaussianProposal:
        """The proposal for batch ``x`` (fitted on first use)."""
        if self._x_ref is None or self._x_ref() is not x:
            with torch.enable_grad(), poutine.block():
                z_init = self.init(x)
                self._proposal = fit_langevin_proposal(
                    self.model, x, z_init, self.num_steps, **self.fit_kwargs
                )
            self._x_ref = weakref.ref(x)
        return self._proposal

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> None:
        self.proposal(x)(x)
