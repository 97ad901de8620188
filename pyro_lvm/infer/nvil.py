r"""A TraceGraph-style ELBO with typed, per-datapoint baselines (NVIL).

For a guide site :math:`z_s` that cannot be reparameterized, the ELBO gradient through its
sampling distribution is estimated with the score function and the site's *downstream
cost*: the model and guide log-density terms that depend on :math:`z_s` (found by Pyro's
provenance tracking, as in :class:`pyro.infer.TraceGraph_ELBO`),

.. math::

    \nabla_\phi \mathcal L \;\approx\; \sum_s \sum_i
        \nabla_\phi \log q_\phi(z_{s,i}) \,
        \big(\ell_{s,i} - b_{s,i}\big)
      \; + \; \text{pathwise terms},
    \qquad
    \ell_{s,i} = \sum_{t \,\succeq\, s} \big[\log p(\cdot_{t,i}) - \log q(\cdot_{t,i})\big],

where :math:`i` runs over the data plate (the estimator is Rao-Blackwellized both by the
model's dependency structure and by conditional independence of the datapoints) and
:math:`b_{s,i}` comes from the site's baselines (:mod:`pyro_lvm.infer.baselines`).

Differences from :class:`pyro.infer.TraceGraph_ELBO`:

* learning signals are *per datapoint and free of the subsample scale* :math:`N/B`:
  baselines see (and are fitted to) the per-datapoint signal, and the centred signal is
  scaled back afterwards (Pyro fits its baselines to the scaled cost, so a baseline
  learned at one batch size is wrong at another, and neural baselines must learn
  :math:`N/B`);
* baselines are typed :class:`torch.nn.Module` objects attached per site, and the
  running average is kept per dataset row (keyed by the data plate's subsample indices),
  so the batch size may change between steps;
* masks and scales follow Pyro: the score function of a masked (or zero-scaled) guide
  element is kept and multiplied by its downstream costs, which carry their own masks
  and scales, so a masked latent whose value drives unmasked observations still gets
  its gradient, exactly as in ``TraceGraph_ELBO``;
* :meth:`differentiable_loss` exists, so the estimator works as a plain torch loss
  (:class:`~pyro_lvm.infer.ModuleSVI`, Lightning) as well as with :class:`pyro.infer.SVI`.

With ``rao_blackwellize=False`` every site's signal is the datapoint's whole log weight
:math:`\log p(x_i, z_i) - \log q(z_i \mid x_i)`: plain REINFORCE ("score function on
the full ELBO", Rao-Blackwellized only by the data plate), the reference estimator of the
NVIL and VIMCO papers.

References
----------
Mnih, Gregor (2014), "Neural Variational Inference and Learning in Belief Networks", ICML.
Schulman, Heess, Weber, Abbeel (2015), "Gradient Estimation Using Stochastic Computation
Graphs", NeurIPS.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

import pyro
import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.tracegraph_elbo import TrackNonReparam
from pyro.infer.util import MultiFrameTensor, is_validation_enabled
from pyro.ops.provenance import detach_provenance, get_provenance
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_if_enumerated
from torch import nn

from pyro_lvm.infer.baselines import (
    Baseline,
    BaselineContext,
    NeuralBaseline,
    SignalNormalization,
)

__all__ = ["TraceNVIL_ELBO"]

BaselineSpec = Baseline | SignalNormalization | Sequence[Baseline | SignalNormalization]


def _as_module_list(name: str, spec: BaselineSpec) -> nn.ModuleList:
    items = [spec] if isinstance(spec, nn.Module) else list(spec)
    for item in items:
        if not isinstance(item, (Baseline, SignalNormalization)):
            raise ValueError(
                f"baseline for site {name!r} must be a Baseline or SignalNormalization "
                f"object (or a list of them), got {type(item).__name__}"
            )
    return nn.ModuleList(items)


def _apply_baselines(
    stack: nn.ModuleList, ctx: BaselineContext, signal: torch.Tensor, update: bool
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Centre (and normalise) a detached signal; returns it and the baselines' fit loss."""
    centred, fit_loss = signal, 0.0
    for item in stack:
        if isinstance(item, SignalNormalization):
            scale = item.scale.to(centred)
            if update:
                item.update(centred)
            centred = centred / scale
            continue
        prediction = item.predict(ctx, centred)
        fit_loss = fit_loss + item.loss(prediction, centred)
        if update:
            item.update(ctx, centred)
        centred = centred - prediction.detach()
    return centred, fit_loss


class _RecordSubsample(Messenger):
    """Remember each plate's subsample indices (the trace prunes those sites)."""

    def __init__(self):
        super().__init__()
        self.indices: dict[str, torch.Tensor] = {}

    def _pyro_post_sample(self, msg) -> None:
        if site_is_subsample(msg):
            self.indices[msg["name"]] = msg["value"]


def _nonzero(scale):
    """The site's scale with zeros replaced by 1: a guide element scaled by 0 drops its
    own log q, but its downstream costs (scaled by their own sites) still count."""
    if torch.is_tensor(scale):
        return torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale if scale != 0 else 1.0


def _structure_key(model_trace, guide_trace) -> tuple:
    """Site names, in order, of both traces: the key of a cached dependency structure."""
    return tuple(
        (kind, name)
        for kind, trace in (("model", model_trace), ("guide", guide_trace))
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
    )


class TraceNVIL_ELBO(ELBO):
    r"""Rao-Blackwellized score-function ELBO with per-site, per-datapoint baselines.

    Parameters
    ----------
    num_particles : int
        Samples per gradient estimate (averaged).
    max_plate_nesting : int
        Plates in the model (guessed if omitted).
    vectorize_particles : bool
        Draw the particles in one vectorized pass.
    baselines : Mapping[str, Baseline | SignalNormalization | list], optional
        Site name -> baseline object or list of them (combined in order; see
        :mod:`pyro_lvm.infer.baselines`). Sites without an entry use no baseline. Every
        named site must be a non-reparameterizable guide site; in a batch where it is
        observed (a semi-supervised guide's labelled ``y``) it has no score term, and
        its baseline is skipped.
    rao_blackwellize : bool
        Use each site's downstream cost (default) or the datapoint's whole log weight
        (plain REINFORCE).
    data_plate : str
        Name of the plate over datapoints (indices for per-datapoint baselines).
    cache_dependencies : bool
        Find the dependency structure once per set of site names and reuse it, instead of
        tracking provenance at every step (which roughly doubles the cost of a step). Only
        for models whose dependencies do not change with the sampled values (no
        value-dependent control flow), such as every model in :mod:`pyro_lvm.models`.
    **elbo_options
        Any other keyword of :class:`pyro.infer.ELBO` (``strict_enumeration_warning``,
        ``retain_graph``, ...), so the estimator drops in wherever ``TraceGraph_ELBO``
        is constructed.

    Examples
    --------
    >>> elbo = TraceNVIL_ELBO(baselines={"z": [RunningAverageBaseline(N), NeuralBaseline(net),
    ...                                         SignalNormalization(0.8)]})
    >>> optim = torch.optim.Adam([*lvm.parameters(), *elbo.parameters()], lr=1e-3)
    >>> ModuleSVI(lvm.model, lvm.guide, optim, loss=elbo).step(x, idx)  # doctest: +SKIP
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        baselines: Mapping[str, BaselineSpec] | None = None,
        rao_blackwellize: bool = True,
        data_plate: str = "data",
        cache_dependencies: bool = False,
        **elbo_options,
    ):
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **elbo_options,
        )
        if baselines is not None and not isinstance(baselines, Mapping):
            raise ValueError(
                "baselines must map site names to baseline objects, e.g. "
                "{'z': RunningAverageBaseline(num_data)}"
            )
        self.baselines = nn.ModuleDict(
            {name: _as_module_list(name, spec) for name, spec in (baselines or {}).items()}
        )
        self.rao_blackwellize = rao_blackwellize
        self.data_plate = data_plate
        self.cache_dependencies = cache_dependencies
        self._dependencies: dict[tuple, dict] = {}

    # -- baseline state, so the estimator checkpoints like a module -------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        """Learnable baseline parameters (optimise them with the model's)."""
        return self.baselines.parameters()

    def state_dict(self) -> dict:
        return self.baselines.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.baselines.load_state_dict(state)

    def train(self, mode: bool = True) -> TraceNVIL_ELBO:
        """Let baselines update their running state (default) or freeze them."""
        self.baselines.train(mode)
        return self

    def eval(self) -> TraceNVIL_ELBO:
        return self.train(False)

    # -- traces ----------------------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        """The guide trace, the model replayed against it, the data plate's subsample
        indices and the dependency structure: for each ``(kind, site)`` term the
        non-reparameterized guide sites it depends on (``None`` without
        Rao-Blackwellization)."""
        use_cache = self.rao_blackwellize and self.cache_dependencies and self._dependencies
        traces = self._trace(
            model, guide, args, kwargs, track=self.rao_blackwellize and not use_cache
        )
        model_trace, guide_trace, indices = traces
        if not self.rao_blackwellize:
            return model_trace, guide_trace, indices, None
        key = _structure_key(model_trace, guide_trace)
        if use_cache:
            if key in self._dependencies:
                return model_trace, guide_trace, indices, self._dependencies[key]
            # a structure not seen before: trace again with provenance tracking
            model_trace, guide_trace, indices = self._trace(model, guide, args, kwargs, True)
            key = _structure_key(model_trace, guide_trace)
        deps = {
            (kind, name): frozenset(get_provenance(site["log_prob_sum"]))
            for kind, trace in (("model", model_trace), ("guide", guide_trace))
            for name, site in trace.nodes.items()
            if site["type"] == "sample"
        }
        if self.cache_dependencies:
            self._dependencies[key] = deps
        return model_trace, guide_trace, indices, deps

    def _trace(self, model, guide, args, kwargs, track: bool):
        recorder = _RecordSubsample()
        # provenance tracking finds the dependency structure (costly: every torch op on a
        # tracked tensor goes through __torch_function__)
        tracker = TrackNonReparam() if track else contextlib.nullcontext()
        with tracker, recorder:
            model_trace, guide_trace = get_importance_trace(
                "dense", self.max_plate_nesting, model, guide, args, kwargs
            )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace, recorder.indices.get(self.data_plate)

    # -- the estimator ---------------------------------------------------------------
    def _non_reparam_sites(self, model_trace, guide_trace) -> list[str]:
        # an observed guide site is not drawn, so it has no score term (as Pyro's
        # nonreparam_stochastic_nodes): a semi-supervised guide observes y when labelled
        names = [
            name
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and not is_identically_zero(site["score_parts"].score_function)
        ]
        for name in self.baselines:
            site = guide_trace.nodes.get(name)
            drawn = site is not None and site["type"] == "sample" and not site["is_observed"]
            if not drawn and name in model_trace.nodes:
                continue  # observed (or not sampled by the guide) in this batch: no score term
            if not drawn:
                raise ValueError(
                    f"a baseline is configured for site {name!r}, which is not a sample site "
                    "of the guide or the model; fix the site name"
                )
            if name not in names:
                raise ValueError(
                    f"a baseline is configured for site {name!r}, which is reparameterizable "
                    "(its gradient is pathwise); remove that baseline"
                )
        return names

    def _downstream_costs(
        self, model_trace, guide_trace, sites, deps
    ) -> dict[str, MultiFrameTensor]:
        costs: dict[str, MultiFrameTensor] = defaultdict(MultiFrameTensor)
        for kind, trace, sign in (("model", model_trace, 1.0), ("guide", guide_trace, -1.0)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                # the non-reparameterized sites this term depends on
                owners = deps[(kind, name)] if deps is not None else sites
                for owner in owners:
                    costs[owner].add((site["cond_indep_stack"], sign * site["log_prob"]))
        return costs

    def _particle(self, model_trace, guide_trace, indices, deps, args, update: bool):
        """ELBO, surrogate ELBO (its gradient is the estimate) and baseline fit loss."""
        elbo = surrogate = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"]
                surrogate = surrogate + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo - site["log_prob_sum"]
                entropy_term = site["score_parts"].entropy_term
                if not is_identically_zero(entropy_term):
                    surrogate = surrogate - entropy_term.sum()

        sites = self._non_reparam_sites(model_trace, guide_trace)
        costs = self._downstream_costs(model_trace, guide_trace, sites, deps)
        fit_loss = 0.0
        for name in sites:
            guide_site = guide_trace.nodes[name]
            if name not in costs:
                continue
            scale = _nonzero(guide_site["scale"])
            stack = guide_site["cond_indep_stack"]
            # per-datapoint signal, relative to the site's own (subsample) scale
            signal = detach_provenance(costs[name].sum_to(stack)).detach() / scale
            data_dims = [f.dim for f in stack if f.name == self.data_plate and f.vectorized]
            ctx = BaselineContext(
                name, data_dims[0] if data_dims else None, indices, args, guide_trace
            )
            if name in self.baselines:
                signal, site_fit = _apply_baselines(self.baselines[name], ctx, signal, update)
                fit_loss = fit_loss + site_fit
            # no mask here: a masked guide element drops its own log q, but its value
            # still drives the unmasked terms downstream (as in TraceGraph_ELBO, the
            # score function is neither masked nor scaled, its cost is)
            # Pyro leaves the score function unscaled: scale the centred signal back
            score = guide_site["score_parts"].score_function
            surrogate = surrogate + (score * (signal * scale)).sum()
        return (
            detach_provenance(elbo),
            detach_provenance(surrogate),
            fit_loss,
        )

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        r"""Minus the ELBO, with the estimator's gradient.

        Its value is the Monte Carlo estimate of :math:`-\mathcal L` (summed over the
        batch, scaled by the data plate's subsample scale); its gradient with respect to
        model and guide parameters is the Rao-Blackwellized score-function estimate, and
        with respect to neural baselines the gradient of their least-squares fit. In
        training mode, running baselines are updated as a side effect.
        """
        loss = surrogate_loss = 0.0
        update = self.baselines.training
        for model_trace, guide_trace, indices, deps in self._get_traces(
            model, guide, args, kwargs
        ):
            elbo, surrogate, fit_loss = self._particle(
                model_trace, guide_trace, indices, deps, args, update
            )
            loss = loss - elbo / self.num_particles
            surrogate_loss = surrogate_loss + (fit_loss - surrogate) / self.num_particles
        if not torch.is_tensor(surrogate_loss):
            return torch.as_tensor(loss)
        return loss.detach() + (surrogate_loss - surrogate_loss.detach())

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        """The Monte Carlo estimate of minus the ELBO (baselines are not touched)."""
        total = 0.0
        for model_trace, guide_trace, *_ in self._get_traces(model, guide, args, kwargs):
            elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
            total -= float(detach_provenance(elbo)) / self.num_particles
        return total

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Backpropagate :meth:`differentiable_loss`; returns minus the ELBO estimate.

        Neural baselines are registered with :func:`pyro.module` first, so
        :class:`pyro.infer.SVI` finds and optimises their parameters.
        """
        for name, stack in self.baselines.items():
            for k, item in enumerate(stack):
                if isinstance(item, NeuralBaseline):
                    pyro.module(f"_nvil_baseline_{name}_{k}", item.module)
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())
