r"""DisARM: antithetic gradients for a factorized Bernoulli layer (Dong, Mnih, Tucker 2020).

For a guide with one factorized Bernoulli site :math:`b \sim \prod_j
\mathrm{Bern}(\sigma(\alpha_j))` and :math:`f(b) = \log p(x, b) - \log q(b \mid x)`,
one uniform draw :math:`u` gives the antithetic pair

.. math::

    b_j = 1[u_j < \sigma(\alpha_j)], \qquad \tilde b_j = 1[1 - u_j < \sigma(\alpha_j)],

both distributed as :math:`q`, and the unbiased estimate of
:math:`\nabla_{\alpha} \mathbb E_q[f(b)]`

.. math::

    \hat g_{\alpha_j} = \tfrac12 \big(f(b) - f(\tilde b)\big)\,
        (-1)^{\tilde b_j}\, 1[b_j \ne \tilde b_j]\, \sigma(|\alpha_j|),

which is ARM (Yin & Zhou 2019) Rao-Blackwellized over the antithetic pair. The term
:math:`\mathbb E_q[\nabla_\phi \log q_\phi(b)] = 0` is left out; model parameters get the
pathwise gradient of :math:`\tfrac12(\log p(x, b) + \log p(x, \tilde b))`. Cost: one guide
pass and two model passes per pair. Per datapoint (data plate at dim -1).

References
----------
Dong, Mnih, Tucker (2020), "DisARM: An Antithetic Gradient Estimator for Binary Latent
Variables", NeurIPS.
Yin, Zhou (2019), "ARM: Augment-REINFORCE-Merge Gradient for Stochastic Binary
Networks", ICLR.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample

__all__ = ["DisARM"]


def _bernoulli_logits(fn) -> torch.Tensor | None:
    """Logits of a (to_event) factorized Bernoulli distribution, else ``None``."""
    while isinstance(fn, (dist.Independent, dist.torch.Independent)):
        fn = fn.base_dist
    if isinstance(fn, dist.Bernoulli):
        return fn.logits
    return None


def _per_datapoint(trace) -> tuple[torch.Tensor, float]:
    """Unscaled log-densities summed per datapoint ``(B,)`` and the data plate scale."""
    total, scales = 0.0, set()
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["fn"].log_prob(site["value"])
        if lp.dim() != 1:
            raise ValueError(
                f"DisARM needs site {name!r} inside the data plate (dim -1) and no other "
                "plates; move it into pyro.plate('data')"
            )
        scales.add(float(site["scale"]))
        total = total + lp
    if len(scales) != 1:
        raise ValueError(f"DisARM needs one subsample scale for all sites, got {sorted(scales)}")
    return total, scales.pop()


class DisARM(ELBO):
    r"""ELBO gradient estimator for guides with one factorized Bernoulli sample site.

    Parameters
    ----------
    num_particles : int
        Antithetic pairs per estimate (averaged).
    """

    def __init__(self, num_particles: int = 1):
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        super().__init__(num_particles=num_particles, max_plate_nesting=1)

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - unused
        raise NotImplementedError

    def _pair(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        latents = [
            (name, site)
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        ]
        logits = _bernoulli_logits(latents[0][1]["fn"]) if len(latents) == 1 else None
        if logits is None:
            raise ValueError(
                "DisARM needs a guide with exactly one factorized Bernoulli sample site (one "
                "layer); use TraceNVIL_ELBO or VIMCO for other guides"
            )
        name, site = latents[0]
        logits = logits.expand(site["value"].shape)
        with torch.no_grad():
            u = torch.rand_like(logits)
            p = torch.sigmoid(logits)
            b, b_anti = (u < p).to(logits), (1 - u < p).to(logits)
        out = []
        for value in (b, b_anti):
            log_q = site["fn"].log_prob(value)
            model_trace = poutine.trace(poutine.condition(model, data={name: value})).get_trace(
                *args, **kwargs
            )
            log_p, scale = _per_datapoint(model_trace)
            out.append((log_p, log_q))
        (log_p, log_q), (log_p_anti, log_q_anti) = out
        f, f_anti = (log_p - log_q).detach(), (log_p_anti - log_q_anti).detach()
        coeff = 0.5 * (f - f_anti).unsqueeze(-1) * (1 - 2 * b_anti) * (b != b_anti)
        grad_logits = coeff * torch.sigmoid(logits.abs()).detach()
        elbo = scale * 0.5 * (f + f_anti).sum()
        surrogate = scale * (0.5 * (log_p + log_p_anti).sum() + (grad_logits * logits).sum())
        return elbo, surrogate

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Minus the ELBO estimate (mean over the pair), with DisARM's gradient."""
        loss = 0.0
        for _ in range(self.num_particles):
            elbo, surrogate = self._pair(model, guide, args, kwargs)
            loss = loss + (-elbo - (surrogate - surrogate.detach())) / self.num_particles
        return loss

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of minus the ELBO."""
        return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())
