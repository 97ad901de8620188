r"""VIMCO: the multi-sample bound with leave-one-out baselines (Mnih & Rezende 2016).

With :math:`K` particles :math:`z^{(1..K)} \sim q_\phi(z \mid x_i)` per datapoint and log
weights :math:`\log w_k = \log p_\theta(x_i, z^{(k)}) - \log q_\phi(z^{(k)} \mid x_i)`,
the bound is

.. math::

    \hat L = \log \frac1K \sum_{k=1}^K w_k \;\le\; \log p(x_i) \text{ in expectation.}

Its gradient, for guide sites that cannot be reparameterized,

.. math::

    \nabla \hat L = \sum_k \big(\hat L - \hat L_{-k}\big)\, \nabla_\phi \log q_\phi(z^{(k)})
                  + \sum_k \tilde w_k\, \nabla \log w_k ,
    \qquad
    \hat L_{-k} = \log \frac1K \Big(\sum_{j \ne k} w_j + \exp\!\Big(\frac{1}{K-1}
                  \sum_{j\ne k}\log w_j\Big)\Big),

where :math:`\tilde w_k = w_k / \sum_j w_j`. The leave-one-out baseline
:math:`\hat L_{-k}` replaces :math:`w_k` by the geometric mean of the others; it does not
depend on :math:`z^{(k)}`, so the estimate stays unbiased for :math:`\nabla\,\mathbb
E[\hat L]`, and the per-particle learning signal is small (each sample's credit is its
marginal contribution to the bound). Reparameterizable guide sites contribute pathwise
through :math:`\log w_k`.

Weights are per datapoint (the data plate, found by name); the loss is
:math:`-\sum_i s_i \hat L(x_i)` with each datapoint's scale :math:`s_i` (the data plate's
subsample scale :math:`N/B`, or a per-datapoint :func:`pyro.poutine.scale`).

References
----------
Mnih, Rezende (2016), "Variational Inference for Monte Carlo Objectives", ICML.
Burda, Grosse, Salakhutdinov (2016), "Importance Weighted Autoencoders", ICLR.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.util import check_if_enumerated

__all__ = ["VIMCO", "leave_one_out_signals"]


def leave_one_out_signals(log_w: torch.Tensor) -> torch.Tensor:
    r"""VIMCO's learning signals :math:`\hat L - \hat L_{-k}` for log weights ``(K, ...)``.

    Computed in log space; ``K x K`` per datapoint, which is cheap for the particle
    counts VIMCO is used with.
    """
    k = log_w.shape[0]
    log_w = log_w.detach()
    bound = log_w.logsumexp(0)
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)  # (K, ...)
    # row j of `loo` is the particle set with w_j replaced by the others' geometric mean
    loo = log_w.unsqueeze(0).expand((k,) + log_w.shape).clone()
    eye = torch.eye(k, dtype=torch.bool, device=log_w.device)
    eye = eye.reshape(eye.shape + (1,) * (log_w.dim() - 1)).expand_as(loo)
    loo[eye] = others_mean.reshape(-1)
    return bound - loo.logsumexp(1)


def _same_scale(a, b) -> bool:
    if not torch.is_tensor(a) and not torch.is_tensor(b):
        return a == b
    like = a if torch.is_tensor(a) else b
    a, b = (torch.as_tensor(t, dtype=like.dtype, device=like.device) for t in (a, b))
    return bool((a == b).all())


class VIMCO(ELBO):
    r"""Gradient estimator of the :math:`K`-sample importance-weighted bound for discrete
    (or mixed) latents; its loss is minus that bound.

    The weights follow Pyro's ELBO conventions: masked log-density elements
    (:func:`pyro.poutine.mask`, ``dist.mask``) are zero, so a fully masked datapoint has
    bound 0 and an observation masked out is simply not observed (a masked guide element
    is still drawn from the guide, so its score term stays, as in ``TraceGraph_ELBO``:
    its value may drive unmasked terms); observed guide sites
    (e.g. :func:`pyro.factor` in the guide) enter :math:`\log w` with a minus sign, as
    they enter ``Trace_ELBO``; site scales (subsampling :math:`N/B`,
    :func:`pyro.poutine.scale`, per-datapoint scale tensors) multiply each datapoint's
    bound, which needs every site of a datapoint to carry the same scale.

    Parameters
    ----------
    num_particles : int
        Number of particles :math:`K \ge 2` (always vectorized).
    max_plate_nesting : int
        Plates in the model (guessed if omitted).
    data_plate : str
        Name of the plate over datapoints (any dim): the weights are per element of it,
        so every sample site (model and guide) must be inside it.
    **elbo_options
        Any other keyword of :class:`pyro.infer.ELBO`. ``vectorize_particles`` is
        accepted and ignored: the particles are always drawn in one vectorized pass.

    Raises
    ------
    ValueError
        One line naming the site for a structure the bound does not cover: a site
        outside the data plate (a global latent), a sequential data plate, different
        scales on the sites of one datapoint.
    """

    def __init__(
        self,
        num_particles: int = 2,
        max_plate_nesting: float = float("inf"),
        *,
        data_plate: str = "data",
        **elbo_options,
    ):
        if num_particles < 2:
            raise ValueError(
                f"VIMCO needs num_particles >= 2 for its leave-one-out baselines, got "
                f"{num_particles}; use TraceNVIL_ELBO for a single sample"
            )
        elbo_options.pop("vectorize_particles", None)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
            **elbo_options,
        )
        self.data_plate = data_plate

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = get_importance_trace(
            "flat", self.max_plate_nesting, model, guide, args, kwargs
        )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _data_frame(self, name, site):
        for frame in site["cond_indep_stack"]:
            if frame.name == self.data_plate:
                if not frame.vectorized or frame.dim is None:
                    raise ValueError(
                        f"VIMCO needs a vectorized data plate, but {self.data_plate!r} is "
                        "sequential; use `with pyro.plate(...)` instead of iterating it"
                    )
                return frame
        raise ValueError(
            f"VIMCO needs site {name!r} inside the data plate {self.data_plate!r} so that "
            "weights are per datapoint (global latents are not supported); move it into "
            "the plate, condition it out, or pass data_plate= the plate over datapoints"
        )

    def _per_datapoint(self, t, nest: int, data_dim: int, batch: int) -> torch.Tensor:
        """Sum a ``(K, plates...)`` tensor over every dim but particles and data."""
        t = t.reshape((1,) * (nest - t.dim()) + t.shape)
        keep = nest + data_dim  # position of the data dim
        dims = tuple(d for d in range(1, nest) if d != keep)
        t = t.sum(dim=dims, keepdim=True) if dims else t
        return t.reshape(t.shape[0], t.shape[keep]).expand(self.num_particles, batch)

    def _site_scale(self, name, scale, nest, data_dim, batch):
        """A site's scale as a float or a ``(B,)`` tensor (broadcast off the data dim)."""
        if not torch.is_tensor(scale):
            return float(scale)
        s = scale.reshape((1,) * (nest - scale.dim()) + scale.shape)
        keep = nest + data_dim
        if any(n != 1 for d, n in enumerate(s.shape) if d != keep):
            raise ValueError(
                f"site {name!r} has a scale of shape {tuple(scale.shape)} that varies within "
                "a datapoint; VIMCO needs one scale per datapoint: scale along the data "
                "plate only"
            )
        return s.reshape(-1).expand(batch)

    def _log_weights(self, model_trace, guide_trace):
        """Unscaled, masked per-datapoint log weights ``(K, B)``, the score terms
        ``(K, B)`` and the per-datapoint scale (a float or a ``(B,)`` tensor)."""
        nest = self.max_plate_nesting  # includes the particle plate
        log_w = score = 0.0
        scale = None
        scale_site = None
        data_dim = batch = None
        for kind, trace in (("model", model_trace), ("guide", guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                frame = self._data_frame(name, site)
                if data_dim is None:
                    data_dim, batch = frame.dim, frame.size
                site_scale = self._site_scale(name, site["scale"], nest, data_dim, batch)
                if scale is None:
                    scale, scale_site = site_scale, name
                elif not _same_scale(scale, site_scale):
                    raise ValueError(
                        f"sites {scale_site!r} and {name!r} have different scales; VIMCO "
                        "scales each datapoint's bound, so scale the model and guide as a "
                        "whole (poutine.scale around both)"
                    )
                lp = scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])
                lp = self._per_datapoint(lp, nest, data_dim, batch)
                if kind == "model":
                    log_w = log_w + lp
                else:
                    log_w = log_w - lp
                    if not site["is_observed"] and not getattr(site["fn"], "has_rsample", False):
                        # the particles are drawn from the unmasked guide: a masked
                        # element's value still drives the unmasked terms of log w, so
                        # its score (Pyro's, neither masked nor scaled) stays
                        sf = site["score_parts"].score_function
                        score = score + self._per_datapoint(sf, nest, data_dim, batch)
        if not torch.is_tensor(log_w):
            raise ValueError("VIMCO found no sample sites in the model and guide")
        return log_w, score, scale

    def _bound_and_surrogate(self, model, guide, args, kwargs):
        (model_trace, guide_trace) = next(self._get_traces(model, guide, args, kwargs))
        log_w, score, scale = self._log_weights(model_trace, guide_trace)
        bound = log_w.logsumexp(0) - math.log(self.num_particles)  # (B,)
        surrogate = bound
        if torch.is_tensor(score):
            signals = leave_one_out_signals(log_w)
            surrogate = bound + (signals * score).sum(0)
        return (scale * bound).sum(), (scale * surrogate).sum()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Minus the K-sample bound (summed over the batch), with VIMCO's gradient."""
        bound, surrogate = self._bound_and_surrogate(model, guide, args, kwargs)
        return -bound.detach() - (surrogate - surrogate.detach())

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of minus the K-sample bound."""
        bound, _ = self._bound_and_surrogate(model, guide, args, kwargs)
        return -float(bound)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())
