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

Weights are per datapoint (the data plate); the loss is :math:`-\sum_i \hat L(x_i)`
times the data plate's subsample scale.

References
----------
Mnih, Rezende (2016), "Variational Inference for Monte Carlo Objectives", ICML.
Burda, Grosse, Salakhutdinov (2016), "Importance Weighted Autoencoders", ICLR.
"""

from __future__ import annotations

import math

import torch
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


class VIMCO(ELBO):
    r"""Gradient estimator of the :math:`K`-sample importance-weighted bound for discrete
    (or mixed) latents; its loss is minus that bound.

    Parameters
    ----------
    num_particles : int
        Number of particles :math:`K \ge 2` (always vectorized).
    max_plate_nesting : int
        Plates in the model (guessed if omitted); every latent site must be inside the
        data plate, the outermost plate.
    """

    def __init__(self, num_particles: int = 2, max_plate_nesting: float = float("inf")):
        if num_particles < 2:
            raise ValueError(
                f"VIMCO needs num_particles >= 2 for its leave-one-out baselines, got "
                f"{num_particles}; use TraceNVIL_ELBO for a single sample"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
        )

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = get_importance_trace(
            "flat", self.max_plate_nesting, model, guide, args, kwargs
        )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _log_weights(self, model_trace, guide_trace):
        """Unscaled per-datapoint log weights ``(K, B)``, the score terms ``(K, B)`` and
        the data plate's subsample scale."""
        k, nest = self.num_particles, self.max_plate_nesting  # nest includes particles
        data_dim = -(nest - 1)
        log_w = score = 0.0
        scales = set()
        for kind, trace in (("model", model_trace), ("guide", guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or (kind == "guide" and site["is_observed"]):
                    continue
                if nest < 2 or not any(f.dim == data_dim for f in site["cond_indep_stack"]):
                    raise ValueError(
                        f"VIMCO needs site {name!r} inside the data plate (dim {data_dim}) "
                        "so that weights are per datapoint; move it into pyro.plate('data')"
                    )
                scales.add(float(site["scale"]))
                lp = site["unscaled_log_prob"]
                lp = lp.reshape((1,) * (nest - lp.dim()) + lp.shape)
                lp = lp.sum(dim=tuple(range(2, lp.dim()))) if lp.dim() > 2 else lp
                lp = lp.expand(k, lp.shape[1])
                if kind == "model":
                    log_w = log_w + lp
                else:
                    log_w = log_w - lp
                    if not getattr(site["fn"], "has_rsample", False):
                        score = score + lp
        if len(scales) != 1:
            raise ValueError(
                f"VIMCO needs one subsample scale for all sites, got {sorted(scales)}"
            )
        return log_w, score, scales.pop()

    def _bound_and_surrogate(self, model, guide, args, kwargs):
        (model_trace, guide_trace) = next(self._get_traces(model, guide, args, kwargs))
        log_w, score, scale = self._log_weights(model_trace, guide_trace)
        bound = log_w.logsumexp(0) - math.log(self.num_particles)  # (B,)
        surrogate = bound
        if torch.is_tensor(score):
            signals = leave_one_out_signals(log_w)
            surrogate = bound + (signals * score).sum(0)
        return scale * bound.sum(), scale * surrogate.sum()

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
