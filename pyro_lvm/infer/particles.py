r"""Importance-sampling particles of a Pyro model and guide, vectorized or one at a time.

A particle is a draw :math:`z \sim q(z \mid x)` from the guide with the model replayed on
it. Its log weight is

.. math::

    \log w = \sum_{s \in \text{model}} \log p_s(\cdot)
             - \sum_{s \in \text{guide latents}} \log q_s(\cdot),

every term with its site's ``scale`` and ``mask`` applied, as
:meth:`pyro.poutine.Trace.log_prob_sum` does (``poutine.mask``, ``poutine.scale`` and
``.mask()`` all count); :math:`\mathbb E_q[w] = p(x)`.

**Per datapoint or whole program.** The *data plate* is the outermost vectorized plate
that encloses every observed site. The terms of a site inside it split by row; a latent
site outside it (a global latent) is drawn once per particle and its term enters every
row, so row :math:`i`'s weight is an unbiased estimate of its own marginal
:math:`p(x_i)` (the rows' estimates then share draws, and their sum is not
:math:`\log p(X)`). A model without a data plate (an observation outside every plate,
or the rows inside an event dimension) does not declare its rows independent: only the
whole program's weight exists, an estimate of :math:`p(X)` for the batch as a whole (the
weight :class:`pyro.infer.RenyiELBO` and
:func:`pyro.infer.importance.vectorized_importance_weights` use).

**Vectorized or one at a time.** :func:`inspect_particles` traces one particle of the
model as it is written (the way :class:`pyro.infer.SVI` runs it), checks the pair, and
finds the data plate and how many batch dimensions the model uses; vectorized particles
then go in a plate to the left of all of them. A model that cannot take that extra
dimension (a ``BatchNorm`` layer, an ``.expand(n)`` to a fixed shape, a reshape that mixes
particles) fails or gives other numbers; :func:`matches_as_written` replays one
vectorized particle as the model is written and compares, so that the estimators can
fall back to one particle per model call, which are the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_lvm.infer.diagnostics import check_observations

__all__ = [
    "ParticleLayout",
    "inspect_particles",
    "trace_particles",
    "log_weights",
    "matches_as_written",
]

PARTICLE_PLATE = "_importance_particles"


class ParticleLayout(NamedTuple):
    """Where particles and rows live in a model/guide pair (:func:`inspect_particles`).

    Attributes
    ----------
    num_dims : int
        Batch dimensions the model uses (plates and undeclared batch dimensions);
        vectorized particles go at ``dim=-(num_dims + 1)``.
    data_plate : str or None
        Name of the data plate; ``None`` when no plate encloses every observed site.
    data_dim : int or None
        Its dimension (negative).
    batch_size : int or None
        Its size: the number of rows.
    value_shapes : dict
        Shape of each guide latent's value in one particle, as the model is written.
    """

    num_dims: int
    data_plate: str | None
    data_dim: int | None
    batch_size: int | None
    value_shapes: dict[str, torch.Size]


def _sample_sites(trace) -> dict[str, dict]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site_is_subsample(site)
        and not site["infer"].get("_deterministic", False)
    }


def _latents(trace) -> dict[str, dict]:
    return {n: s for n, s in _sample_sites(trace).items() if not s["is_observed"]}


def trace_particles(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, num_dims: int, num: int | None
):
    """``(model_trace, guide_trace)`` of ``num`` vectorized particles in a plate at
    ``dim=-(num_dims + 1)``, or of one particle as the model is written (``num=None``).
    Call under ``torch.no_grad()`` and ``poutine.block()``."""
    if num is not None:
        plate = pyro.plate(PARTICLE_PLATE, num, dim=-(num_dims + 1))
        model, guide = plate(model), plate(guide)
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    return model_trace, guide_trace


def _check_pair(model_trace, guide_trace) -> None:
    """One-line errors for a guide that cannot serve as an importance distribution."""
    model_latents, guide_latents = _latents(model_trace), _latents(guide_trace)
    model_sites = _sample_sites(model_trace)
    for name, site in model_latents.items():
        if name in guide_latents:
            continue
        if site["infer"].get("enumerate"):
            raise ValueError(
                f"the model enumerates its latent site {name!r} (infer={{'enumerate': ...}}) "
                "and the guide does not sample it; importance weights do not sum it out: "
                "sample it in the guide"
            )
        raise ValueError(
            f"the guide does not sample the model's latent site {name!r}, so the model "
            "would draw it from its prior inside the weights (not an estimate of log "
            "p(x)); sample it in the guide, or condition the model on it"
        )
    for name in guide_latents:
        if name not in model_sites:
            raise ValueError(
                f"the guide samples {name!r}, which is not a sample site of the model; "
                "remove it from the guide (importance weights need q over the model's "
                "latents only)"
            )
        if model_sites[name]["is_observed"]:
            raise ValueError(
                f"the guide samples {name!r}, which the model observes in this call; sample "
                "it in the guide only when the model does not observe it"
            )
    for trace in (model_trace, guide_trace):
        for site in _sample_sites(trace).values():
            for frame in site["cond_indep_stack"]:
                full = frame.full_size
                if full is not None and full != -1 and full != frame.size:
                    raise ValueError(
                        f"plate {frame.name!r} subsamples {frame.size} of {full} rows "
                        "(subsample_size= or subsample=), which scales the log-densities by "
                        "N/n; pass the rows to evaluate with a full-size plate, "
                        f"pyro.plate({frame.name!r}, {frame.size})"
                    )


def _batch_rank(site) -> int:
    return len(site["fn"].batch_shape)


def _data_plate(model_trace, num_dims: int):
    """The outermost vectorized plate enclosing every observed site, and its size."""
    observed = [s for s in _sample_sites(model_trace).values() if s["is_observed"]]
    if not observed:
        raise ValueError(
            "the model has no observed sample site (pyro.sample(..., obs=x)); there is no "
            "likelihood to estimate"
        )
    common = None
    for site in observed:
        frames = {f.name: f for f in site["cond_indep_stack"] if f.vectorized}
        common = frames if common is None else {n: common[n] for n in common if n in frames}
    if not common:
        return None, None, None
    frame = min(common.values(), key=lambda f: f.dim)
    size = frame.size
    if size is None or size < 0:  # pyro.plate("data") without a size: the data decide
        shape = observed[0]["fn"].batch_shape
        size = ((1,) * (num_dims - len(shape)) + tuple(shape))[frame.dim]
    return frame.name, frame.dim, int(size)


def inspect_particles(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: int | None = None,
) -> ParticleLayout:
    """Trace one particle as the model is written (without consuming the caller's random
    numbers), check the pair, and return its :class:`ParticleLayout`.

    Raises
    ------
    ValueError
        One line naming the problem and the fix: an observation outside its support, a
        model latent the guide does not sample (or a guide site the model does not
        have), a subsampled plate, a model without observations.
    """
    values = (*args, *kwargs.values())
    devices = [a.device for a in values if torch.is_tensor(a) and a.is_cuda]
    with torch.random.fork_rng(devices=devices):
        model_trace, guide_trace = trace_particles(model, guide, args, kwargs, 0, None)
    check_observations(model_trace)
    _check_pair(model_trace, guide_trace)
    sites = [*_sample_sites(model_trace).values(), *_latents(guide_trace).values()]
    plates = [-f.dim for s in sites for f in s["cond_indep_stack"] if f.vectorized]
    num_dims = max([max_plate_nesting or 0, *plates, *(_batch_rank(s) for s in sites)])
    name, dim, size = _data_plate(model_trace, num_dims)
    shapes = {n: s["value"].shape for n, s in _latents(guide_trace).items()}
    return ParticleLayout(num_dims, name, dim, size, shapes)


def _reduce(lp: Tensor, layout: ParticleLayout, per_datapoint: bool, name: str) -> Tensor:
    """A site's log-density summed to ``(num, B)`` (per datapoint) or ``(num,)``."""
    width = layout.num_dims + 1
    if lp.dim() > width:
        raise ValueError(
            f"site {name!r} has {lp.dim()} batch dimensions where the model used "
            f"{layout.num_dims}; pass a larger max_plate_nesting"
        )
    lp = lp.reshape((1,) * (width - lp.dim()) + lp.shape)
    if not per_datapoint:
        return lp.sum(dim=tuple(range(1, width))) if width > 1 else lp
    data = width + layout.data_dim
    rest = tuple(d for d in range(1, width) if d != data)
    lp = lp.sum(dim=rest) if rest else lp
    if lp.shape[1] not in (1, layout.batch_size):
        raise ValueError(
            f"site {name!r} has {lp.shape[1]} entries along the data plate "
            f"{layout.data_plate!r} of {layout.batch_size} rows; its batch shape must "
            "broadcast against the plate"
        )
    return lp


def log_weights(
    model_trace, guide_trace, layout: ParticleLayout, per_datapoint: bool
) -> dict[str, Tensor]:
    """Each site's signed term of :math:`\\log w` (model ``+log p``, guide ``-log q``),
    shape ``(num, B)`` per datapoint or ``(num,)`` for the whole program, keyed
    ``"model:NAME"`` / ``"guide:NAME"``."""
    return {
        **_terms("model", _sample_sites(model_trace), layout, per_datapoint),
        **_terms("guide", _latents(guide_trace), layout, per_datapoint),
    }


def _terms(kind: str, sites: dict, layout: ParticleLayout, per_datapoint: bool) -> dict:
    terms = {}
    sign = 1.0 if kind == "model" else -1.0
    for name, site in sites.items():
        lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
        if torch.is_tensor(lp):  # else a zero log-density
            terms[f"{kind}:{name}"] = sign * _reduce(lp, layout, per_datapoint, name)
    return terms


def total(terms: dict[str, Tensor], num: int, layout: ParticleLayout, per_datapoint: bool):
    """:math:`\\log w` of ``num`` particles from :func:`log_weights`; a NaN or
    :math:`+\\infty` term is a one-line error naming its site."""
    out = 0.0
    for key, term in terms.items():
        bad = torch.isnan(term) | (term == math.inf)
        if bad.any():
            kind, name = key.split(":", 1)
            what = "NaN" if torch.isnan(term).any() else "+inf"
            rows = ""
            if per_datapoint and term.shape[-1] > 1:
                rows = f" for rows {bad.any(0).nonzero().flatten()[:5].tolist()}"
            raise ValueError(
                f"the log-density of the {kind}'s site {name!r} is {what}{rows}; its "
                "distribution got invalid parameters or values (check the network's "
                "output and the data for those rows)"
            )
        out = out + term
    shape = (num, layout.batch_size) if per_datapoint else (num,)
    if not torch.is_tensor(out):
        raise ValueError("the model and guide have no sample sites to weigh")
    return out.expand(shape)


def _one_particle(guide_trace, layout: ParticleLayout, index: int):
    """Particle ``index`` of a vectorized guide trace, as a trace of one particle with
    the shapes of the model as written (``None`` if the shapes do not fit)."""
    picked = poutine.Trace()
    width = layout.num_dims + 1
    for name, shape in layout.value_shapes.items():
        site = guide_trace.nodes[name]
        value = site["value"]
        rank = value.dim() - site["fn"].event_dim
        value = value.reshape((1,) * (width - rank) + value.shape)
        value = value[index if value.shape[0] > 1 else 0]
        if value.numel() != math.prod(shape):
            return None
        picked.add_node(
            name, type="sample", name=name, value=value.reshape(shape), is_observed=False,
            infer=site["infer"],
        )  # fmt: skip
    return picked


def matches_as_written(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    layout: ParticleLayout,
    guide_trace,
    terms: dict[str, Tensor],
    per_datapoint: bool,
) -> bool:
    """Whether the last vectorized particle's terms equal those of the same values run
    through the model as it is written (one particle, no particle dimension), within
    floating-point error. The replay draws no random numbers of the caller's."""
    num = next(iter(terms.values())).shape[0]
    picked = _one_particle(guide_trace, layout, num - 1)
    if picked is None:
        return False
    values = (*args, *kwargs.values())
    devices = [a.device for a in values if torch.is_tensor(a) and a.is_cuda]
    with torch.random.fork_rng(devices=devices):
        try:
            model_trace, guide_one = trace_particles(
                model,
                poutine.replay(guide, trace=picked),
                args,
                kwargs,
                layout.num_dims,
                None,
            )
        except Exception:  # noqa: BLE001 - the model as written fails: not our fast path
            return False
    reference = _terms("model", _sample_sites(model_trace), layout, per_datapoint)
    try:
        reference.update(_terms("guide", _latents(guide_one), layout, per_datapoint))
    except (KeyError, NotImplementedError):
        # a guide whose log q needs its own sample (a flow without an inverse, which
        # caches intermediates): the model's terms are what vectorization could change
        terms = {k: v for k, v in terms.items() if k.startswith("model:")}
    if reference.keys() != terms.keys():
        return False
    for key, ref in reference.items():
        got = terms[key][-1:]
        eps = torch.finfo(got.dtype).eps
        tol = 1000 * eps * (1 + ref.abs())
        same = ((got - ref).abs() <= tol) | (got == ref) | (got.isnan() & ref.isnan())
        if not bool(same.all()):
            return False
    return True
