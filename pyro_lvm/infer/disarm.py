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
from pyro.distributions.util import scale_and_mask
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


def _check_data_plate(name: str, site, data_plate: str) -> None:
    """The only plate of a site must be the (vectorized) data plate at dim -1: DisARM
    pairs each datapoint's latents with that datapoint's terms along dim -1."""
    frames = site["cond_indep_stack"]
    if len(frames) != 1 or frames[0].name != data_plate or frames[0].dim != -1:
        raise ValueError(
            f"DisARM needs site {name!r} inside the data plate {data_plate!r} at dim -1 and "
            f"no other plate; move it into `with pyro.plate({data_plate!r}, ...)`, pass "
            "data_plate=, or use TraceNVIL_ELBO"
        )


def _per_datapoint(trace, data_plate: str, sign: float = 1.0) -> torch.Tensor:
    """Scaled, masked log-densities of a trace summed per datapoint ``(B,)``."""
    total = 0.0
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        _check_data_plate(name, site, data_plate)
        lp = site["fn"].log_prob(site["value"])
        lp = scale_and_mask(lp, site["scale"], site["mask"])
        total = total + sign * lp.expand(site["cond_indep_stack"][0].size)
    return total


class DisARM(ELBO):
    r"""ELBO gradient estimator for guides with one factorized Bernoulli sample site.

    Log-densities are weighed as in :class:`pyro.infer.Trace_ELBO`: masked elements
    (:func:`pyro.poutine.mask`) are left out and scales (subsampling, per-datapoint scale
    tensors, a tempered likelihood) multiply their terms, while the antithetic pair is
    drawn from the unmasked guide.

    Parameters
    ----------
    num_particles : int
        Antithetic pairs per estimate (averaged; drawn one at a time).
    max_plate_nesting : int
        Accepted for :class:`pyro.infer.ELBO` compatibility (DisARM needs one plate).
    data_plate : str
        Name of the plate over datapoints (at dim -1): every site must be inside it and
        in no other plate.
    **elbo_options
        Any other keyword of :class:`pyro.infer.ELBO`; ``vectorize_particles`` is accepted
        and ignored.

    Raises
    ------
    ValueError
        One line naming what is not supported: a guide with other than one Bernoulli
        latent site, observed guide sites (:func:`pyro.factor` in the guide), a model
        latent missing from the guide, a site outside the data plate or in another plate.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        *,
        data_plate: str = "data",
        **elbo_options,
    ):
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        elbo_options.pop("vectorize_particles", None)
        super().__init__(
            num_particles=num_particles, max_plate_nesting=max_plate_nesting, **elbo_options
        )
        self.data_plate = data_plate

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - unused
        raise NotImplementedError

    def _guide_site(self, guide, args, kwargs):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        sites = [
            (name, site)
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)
        ]
        observed = [name for name, site in sites if site["is_observed"]]
        if observed:
            raise ValueError(
                f"DisARM does not support observed guide sites ({observed[0]!r}, e.g. "
                "pyro.factor in the guide): its antithetic pair would not see them; use "
                "TraceNVIL_ELBO or VIMCO"
            )
        logits = _bernoulli_logits(sites[0][1]["fn"]) if len(sites) == 1 else None
        if logits is None:
            raise ValueError(
                "DisARM needs a guide with exactly one factorized Bernoulli sample site (one "
                "layer); use TraceNVIL_ELBO or VIMCO for other guides"
            )
        name, site = sites[0]
        _check_data_plate(name, site, self.data_plate)
        return name, site, logits.expand(site["value"].shape)

    def _log_p(self, model, name, value, args, kwargs) -> torch.Tensor:
        conditioned = poutine.condition(model, data={name: value})
        model_trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
        for other, site in model_trace.nodes.items():
            if (
                site["type"] == "sample"
                and not site["is_observed"]
                and not site_is_subsample(site)
            ):
                raise ValueError(
                    f"model site {other!r} is neither observed nor in the guide; DisARM "
                    "needs the guide's one Bernoulli site to be the model's only latent"
                )
        return _per_datapoint(model_trace, self.data_plate)

    def _pair(self, model, guide, args, kwargs):
        name, site, logits = self._guide_site(guide, args, kwargs)
        with torch.no_grad():
            u = torch.rand_like(logits)
            p = torch.sigmoid(logits)
            b, b_anti = (u < p).to(logits), (1 - u < p).to(logits)
        out = []
        for value in (b, b_anti):
            log_q = scale_and_mask(site["fn"].log_prob(value), site["scale"], site["mask"])
            log_q = log_q.expand(site["cond_indep_stack"][0].size)
            out.append((self._log_p(model, name, value, args, kwargs), log_q))
        (log_p, log_q), (log_p_anti, log_q_anti) = out
        # f: each datapoint's (scaled, masked) ELBO terms, aligned with the latent's
        # event dims so that b_ij is credited with datapoint i's terms only
        f, f_anti = (log_p - log_q).detach(), (log_p_anti - log_q_anti).detach()
        diff = (f - f_anti).reshape(f.shape + (1,) * site["fn"].event_dim)
        coeff = 0.5 * diff * (1 - 2 * b_anti) * (b != b_anti)
        grad_logits = coeff * torch.sigmoid(logits.abs()).detach()
        elbo = 0.5 * (f + f_anti).sum()
        surrogate = 0.5 * (log_p + log_p_anti).sum() + (grad_logits * logits).sum()
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
