r"""VIMCO: the multi-sample bound with leave-one-out baselines (Mnih & Rezende 2016).

With :math:`K` particles :math:`z^{(1..K)} \sim q_\phi(z \mid x)` and log weights
:math:`\log w_k = \log p_\theta(x, z^{(k)}) - \log q_\phi(z^{(k)} \mid x)`, the bound is

.. math::

    \hat L = \log \frac1K \sum_{k=1}^K w_k \;\le\; \log p(x) \text{ in expectation.}

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

Two kinds of weights:

* **per datapoint**, where the datapoints are independent given the parameters: every
  latent site is inside the data plate (found by name) and the sites outside it are
  observed and depend on no latent (a global site conditioned out). Each datapoint
  :math:`x_i` has its own :math:`K` weights and bound, and the loss is
  :math:`-\sum_i s_i \hat L(x_i) - c` with each datapoint's scale :math:`s_i` (the data
  plate's subsample scale :math:`N/B`, or a per-datapoint :func:`pyro.poutine.scale`) and
  :math:`c` the scaled log-densities of the sites outside the plate;
* **whole program**, otherwise (no data plate, a global latent, an observed site outside
  the plate that depends on a latent, a sequential data plate, sites of one datapoint
  scaled differently): one weight per particle for the whole program,
  :math:`\log w_k = \sum_{\text{sites}} s \log p - \sum s \log q` over the scaled and
  masked log-densities. These are the weights of Pyro's ``RenyiELBO(alpha=0)`` on a
  model where no plate holds every site (Renyi keeps such a plate's elements apart).

References
----------
Mnih, Rezende (2016), "Variational Inference for Monte Carlo Objectives", ICML.
Burda, Grosse, Salakhutdinov (2016), "Importance Weighted Autoencoders", ICLR.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.ops.provenance import get_provenance, track_provenance
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_if_enumerated

__all__ = ["VIMCO", "leave_one_out_signals"]


def leave_one_out_signals(log_w: torch.Tensor) -> torch.Tensor:
    r"""VIMCO's learning signals :math:`\hat L - \hat L_{-k}` for log weights ``(K, ...)``.

    :math:`\log \sum_{j \ne k} w_j` and :math:`\sum_{j \ne k} \log w_j` come from prefix
    and suffix (log-)cumulative sums, so the cost is linear in :math:`K` and nothing is
    subtracted: no cancellation when one weight dominates, and a zero weight
    (:math:`\log w_k = -\infty`) gives finite signals instead of ``inf - inf``.
    """
    k = log_w.shape[0]
    log_w = log_w.detach()

    def leave_out(scan, empty):  # scan over every j != k: prefix (j < k) and suffix (j > k)
        fill = torch.full_like(log_w[:1], empty)
        prefix = torch.cat([fill, scan(log_w)[:-1]])
        suffix = torch.cat([scan(log_w.flip(0)).flip(0)[1:], fill])
        return prefix, suffix

    prefix, suffix = leave_out(lambda t: t.logcumsumexp(0), -math.inf)
    others = torch.logaddexp(prefix, suffix)  # log sum_{j != k} w_j
    prefix, suffix = leave_out(lambda t: t.cumsum(0), 0.0)
    others_mean = (prefix + suffix) / (k - 1)  # mean_{j != k} log w_j
    return log_w.logsumexp(0) - torch.logaddexp(others, others_mean)


def _same_scale(a, b) -> bool:
    if not torch.is_tensor(a) and not torch.is_tensor(b):
        return a == b
    like = a if torch.is_tensor(a) else b
    a, b = (torch.as_tensor(t, dtype=like.dtype, device=like.device) for t in (a, b))
    return bool((a == b).all())


class _NotPerDatapoint(ValueError):
    """Why the per-datapoint bound does not apply to a model (a one-line message)."""


class _TrackLatents(Messenger):
    """Tag every latent value with its site name, so that a log-density's provenance
    names the latents it depends on."""

    def _pyro_post_sample(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["value"] = track_provenance(msg["value"], frozenset({msg["name"]}))


class _Weights(NamedTuple):
    """One trace's particles: log weights and score terms ``(P, B)`` (per datapoint) or
    ``(P,)`` (whole program), the per-datapoint scale, the constant terms ``(P,)``."""

    log_w: torch.Tensor
    score: torch.Tensor | float
    scale: torch.Tensor | float
    const: torch.Tensor | float


def _sum_to_particles(t, nest: int) -> torch.Tensor:
    """Sum a batch tensor over every dim but the leading particle dim: ``(P,)``."""
    t = torch.as_tensor(t)
    t = t.reshape((1,) * (nest - t.dim()) + t.shape)
    return t.reshape(t.shape[0], -1).sum(-1)


class VIMCO(ELBO):
    r"""Gradient estimator of the :math:`K`-sample importance-weighted bound for discrete
    (or mixed) latents; its loss is minus that bound.

    The weights follow Pyro's ELBO conventions: masked log-density elements
    (:func:`pyro.poutine.mask`, ``dist.mask``) are zero, so a fully masked datapoint has
    bound 0 and an observation masked out is simply not observed (a masked guide element
    is still drawn from the guide, so its score term stays, as in ``TraceGraph_ELBO``:
    its value may drive unmasked terms); observed guide sites
    (e.g. :func:`pyro.factor` in the guide) enter :math:`\log w` with a minus sign, as
    they enter ``Trace_ELBO``. With per-datapoint weights, site scales (subsampling
    :math:`N/B`, :func:`pyro.poutine.scale`, per-datapoint scale tensors) multiply each
    datapoint's bound; with whole-program weights they scale the log-densities inside
    the weight, as in ``RenyiELBO``.

    Parameters
    ----------
    num_particles : int
        Number of particles :math:`K \ge 2`.
    max_plate_nesting : int
        Plates in the model (guessed if omitted).
    data_plate : str
        Name of the plate over datapoints (any dim).
    weights : {"auto", "datapoint", "program"}
        ``"auto"``: per datapoint where the model allows it (see the module docstring;
        an observed site outside the data plate is checked for dependence on the
        latents once per model structure, by provenance tracking), else one weight for
        the whole program. ``"datapoint"``: per datapoint or a one-line refusal naming
        the site that prevents it. ``"program"``: always the whole program.
    **elbo_options
        Any other keyword of :class:`pyro.infer.ELBO`; ``vectorize_particles=True``
        draws the particles in one vectorized pass (as every Pyro ELBO, the default is
        one pass per particle).

    Raises
    ------
    ValueError
        ``num_particles < 2``, an unknown ``weights``; with ``weights="datapoint"``, one
        line naming the site for a structure the per-datapoint bound does not cover.
    """

    def __init__(
        self,
        num_particles: int = 2,
        max_plate_nesting: float = float("inf"),
        *,
        data_plate: str = "data",
        weights: str = "auto",
        **elbo_options,
    ):
        if num_particles < 2:
            raise ValueError(
                f"VIMCO needs num_particles >= 2 for its leave-one-out baselines, got "
                f"{num_particles}; use TraceNVIL_ELBO for a single sample"
            )
        if weights not in ("auto", "datapoint", "program"):
            raise ValueError(
                f"VIMCO(weights={weights!r}) is not a kind of weights; use 'auto', "
                "'datapoint' or 'program'"
            )
        super().__init__(
            num_particles=num_particles, max_plate_nesting=max_plate_nesting, **elbo_options
        )
        self.data_plate = data_plate
        self.weights = weights
        # model structure -> why its sites outside the data plate are not constants
        self._constants_checked: dict[tuple, str | None] = {}

    # -- traces ----------------------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = get_importance_trace(
            "flat", self.max_plate_nesting, model, guide, args, kwargs
        )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _traces(self, model, guide, args, kwargs) -> list:
        if not self.vectorize_particles and self.max_plate_nesting == float("inf"):
            # the weights are reduced over a known number of plate dims
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        return list(self._get_traces(model, guide, args, kwargs))

    def _nest(self) -> int:
        """Batch dims of a site, the particle dim included (a unit one when sequential)."""
        return int(self.max_plate_nesting) + (0 if self.vectorize_particles else 1)

    @staticmethod
    def _sites(model_trace, guide_trace):
        for kind, trace in (("model", model_trace), ("guide", guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "sample":
                    yield kind, name, site

    @staticmethod
    def _has_score(site) -> bool:
        # the particles are drawn from the unmasked guide: a masked element's value still
        # drives the unmasked terms of log w, so its score (Pyro's, neither masked nor
        # scaled) stays
        return not site["is_observed"] and not getattr(site["fn"], "has_rsample", False)

    # -- whole-program weights ---------------------------------------------------------
    def _whole_program(self, model_trace, guide_trace) -> _Weights:
        nest = self._nest()
        log_w = score = 0.0
        for kind, _, site in self._sites(model_trace, guide_trace):
            lp = _sum_to_particles(site["log_prob"], nest)
            log_w = log_w + lp if kind == "model" else log_w - lp
            if kind == "guide" and self._has_score(site):
                score = score + _sum_to_particles(site["score_parts"].score_function, nest)
        particles = self.num_particles if self.vectorize_particles else 1
        if not torch.is_tensor(log_w):  # no sample site: every weight is 1, the bound 0
            log_w = torch.zeros(particles)
        return _Weights(log_w.expand(particles), score, 1.0, 0.0)

    # -- per-datapoint weights ---------------------------------------------------------
    def _data_frame(self, site):
        for frame in site["cond_indep_stack"]:
            if frame.name == self.data_plate:
                if not frame.vectorized or frame.dim is None:
                    raise _NotPerDatapoint(
                        f"VIMCO's per-datapoint weights need a vectorized data plate, but "
                        f"{self.data_plate!r} is sequential; use `with pyro.plate(...)` "
                        "instead of iterating it, or weights='auto' for whole-program weights"
                    )
                return frame
        return None

    def _per_datapoint(self, t, nest: int, data_dim: int, batch: int) -> torch.Tensor:
        """Sum a ``(P, plates...)`` tensor over every dim but particles and data."""
        t = t.reshape((1,) * (nest - t.dim()) + t.shape)
        keep = nest + data_dim  # position of the data dim
        dims = tuple(d for d in range(1, nest) if d != keep)
        t = t.sum(dim=dims, keepdim=True) if dims else t
        particles = self.num_particles if self.vectorize_particles else 1
        return t.reshape(t.shape[0], t.shape[keep]).expand(particles, batch)

    def _site_scale(self, name, scale, nest, data_dim, batch):
        """A site's scale as a float or a ``(B,)`` tensor (broadcast off the data dim)."""
        if not torch.is_tensor(scale):
            return float(scale)
        s = scale.reshape((1,) * (nest - scale.dim()) + scale.shape)
        keep = nest + data_dim
        if any(n != 1 for d, n in enumerate(s.shape) if d != keep):
            raise _NotPerDatapoint(
                f"site {name!r} has a scale of shape {tuple(scale.shape)} that varies within "
                "a datapoint; VIMCO's per-datapoint weights need one scale per datapoint: "
                "scale along the data plate only, or weights='auto' for whole-program weights"
            )
        return s.reshape(-1).expand(batch)

    def _split(self, model_trace, guide_trace):
        """The data frame and the observed sites outside it; refuses a latent outside."""
        frames = {
            (kind, name): self._data_frame(site)
            for kind, name, site in self._sites(model_trace, guide_trace)
        }
        frame = next((f for f in frames.values() if f is not None), None)
        if frame is None:
            raise _NotPerDatapoint(
                f"VIMCO found no site inside the data plate {self.data_plate!r}; pass "
                "data_plate= the plate over datapoints, or weights='auto' for whole-program "
                "weights"
            )
        outside = []
        for kind, name, site in self._sites(model_trace, guide_trace):
            if frames[kind, name] is not None:
                continue
            if not site["is_observed"]:
                raise _NotPerDatapoint(
                    f"VIMCO needs site {name!r} inside the data plate {self.data_plate!r} "
                    "for per-datapoint weights (global latents are not supported there); "
                    "move it into the plate, condition it out, or use weights='auto' for "
                    "whole-program weights"
                )
            outside.append((kind, name))
        return frame, outside

    def _check_constants(self, model, guide, args, kwargs, model_trace, guide_trace, outside):
        """Refuse an observed site outside the data plate whose log-density depends on
        a latent: it couples the datapoints. One provenance-tracked pass per structure."""
        key = tuple((kind, name) for kind, name, _ in self._sites(model_trace, guide_trace))
        if key not in self._constants_checked:
            with _TrackLatents(), torch.no_grad():
                traces = self._get_traces(model, guide, args, kwargs)
                tracked = dict(zip(("model", "guide"), next(iter(traces))))
            refusal = None
            for kind, name in outside:
                deps = get_provenance(tracked[kind].nodes[name]["unscaled_log_prob"])
                if deps:
                    refusal = (
                        f"VIMCO needs site {name!r} inside the data plate "
                        f"{self.data_plate!r} for per-datapoint weights: outside, it depends "
                        f"on the latents {sorted(deps)}, which couples the datapoints; move "
                        "it into the plate, or use weights='auto' for whole-program weights"
                    )
                    break
            self._constants_checked[key] = refusal
        if self._constants_checked[key] is not None:
            raise _NotPerDatapoint(self._constants_checked[key])

    def _datapoint_weights(self, model, guide, args, kwargs, model_trace, guide_trace):
        frame, outside = self._split(model_trace, guide_trace)
        if outside:
            self._check_constants(model, guide, args, kwargs, model_trace, guide_trace, outside)
        nest = self._nest()
        data_dim, batch = frame.dim, frame.size
        log_w = score = const = 0.0
        scale = scale_site = None
        for kind, name, site in self._sites(model_trace, guide_trace):
            sign = 1.0 if kind == "model" else -1.0
            if (kind, name) in outside:  # depends on no latent: a constant, scaled
                const = const + sign * _sum_to_particles(site["log_prob"], nest)
                continue
            site_scale = self._site_scale(name, site["scale"], nest, data_dim, batch)
            if scale is None:
                scale, scale_site = site_scale, name
            elif not _same_scale(scale, site_scale):
                raise _NotPerDatapoint(
                    f"sites {scale_site!r} and {name!r} have different scales; VIMCO's "
                    "per-datapoint weights scale each datapoint's bound, so scale the model "
                    "and guide as a whole (poutine.scale around both), or use weights='auto' "
                    "for whole-program weights"
                )
            lp = scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])
            log_w = log_w + sign * self._per_datapoint(lp, nest, data_dim, batch)
            if kind == "guide" and self._has_score(site):
                sf = site["score_parts"].score_function
                score = score + self._per_datapoint(sf, nest, data_dim, batch)
        return _Weights(log_w, score, scale, const)

    # -- the estimator ---------------------------------------------------------------
    def _weights(self, model, guide, args, kwargs) -> _Weights:
        """Every particle's weights: ``(K, B)`` per datapoint or ``(K,)``."""
        traces = self._traces(model, guide, args, kwargs)
        if self.weights != "program":
            try:
                return self._stack(
                    [self._datapoint_weights(model, guide, args, kwargs, *t) for t in traces]
                )
            except _NotPerDatapoint:
                if self.weights == "datapoint":
                    raise
        return self._stack([self._whole_program(*t) for t in traces])

    def _stack(self, parts: list[_Weights]) -> _Weights:
        log_w = torch.cat([p.log_w for p in parts])
        score = 0.0
        if any(torch.is_tensor(p.score) for p in parts):
            score = torch.cat([p.score + torch.zeros_like(p.log_w) for p in parts])
        # the constant terms, equal across particles: their mean
        const = sum(torch.as_tensor(p.const).sum() for p in parts) / self.num_particles
        return _Weights(log_w, score, parts[0].scale, const)

    def _bound_and_surrogate(self, model, guide, args, kwargs):
        log_w, score, scale, const = self._weights(model, guide, args, kwargs)
        bound = log_w.logsumexp(0) - math.log(self.num_particles)  # (B,) or ()
        surrogate = bound
        if torch.is_tensor(score):
            surrogate = bound + (leave_one_out_signals(log_w) * score).sum(0)
        return (scale * bound).sum() + const, (scale * surrogate).sum() + const

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
