r"""One inspection of a Pyro model for every sampler: which latent sites it has, where they
live, how they map to an unconstrained space, and their log density at given values.

:func:`inspect_model` traces the model once from the prior (without consuming the
caller's random numbers) and returns a :class:`ModelSites`:

* the **local** latent sites, inside the data plate (one value per datapoint: what an
  amortized encoder outputs, what AIS, refinement and particle methods sample per row);
* the **global** latent sites, outside every data plate (ALD moves them by MALA beside the
  chain; the per-datapoint samplers refuse them);
* for every latent site the bijection :math:`T_s = ` ``biject_to(site.support)`` from
  Pyro's unconstrained space, ``None`` for real supports.

Densities are taken in the unconstrained space, with the change of variables

.. math::

    \log p(x, u) = \log p\bigl(x, z = T(u)\bigr)
                   + \sum_s \log\bigl|\det \partial T_s / \partial u_s\bigr|,

computed by running the model conditioned on :math:`z = T(u)`
(``poutine.condition``, traced inside ``poutine.block``): :func:`log_joint` sums it over
the whole program (ALD's potential), :func:`log_densities` splits it per chain and
datapoint into the latent and the observed terms (AIS anneals only the latter).
Every term honours the site's ``scale`` and ``mask`` (``poutine.scale``,
``poutine.mask``, ``.mask()``), as Pyro's own ``Trace.log_prob_sum`` does.

Per-datapoint samplers pack the local sites into one flat tensor of shape
``(num_chains, B, size)`` (:func:`pack`, :func:`unpack`); the conditioned values carry
the chain dimension left of the data plate and broadcast through the model, so each chain
of each datapoint is an independent target. Evaluation opens no plate of its own (Pyro
allocates plate dimensions globally), so it also runs inside an outer particle plate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_lvm.infer.diagnostics import check_observations

__all__ = [
    "ModelSites",
    "inspect_model",
    "find_latents",
    "trace_prior",
    "check_subsampling",
    "constrain",
    "unconstrain",
    "global_values",
    "log_joint",
    "pack",
    "unpack",
    "sample_prior",
    "check_vectorized",
    "LatentsCache",
    "log_densities",
    "trace_log_densities",
]

_CHAIN_PLATE = "_latent_chains"


class ModelSites(NamedTuple):
    """The latent sites of a model, as :func:`inspect_model` found them.

    Attributes
    ----------
    local_names : tuple of str
        Latent sites inside the data plate, in trace order.
    local_shapes : dict
        Each local site's unconstrained value shape, plate dimensions included (as traced).
    transforms : dict
        ``biject_to(site.support)`` per latent site, ``None`` for real supports.
    global_names : tuple of str
        Latent sites outside the data plate, in trace order.
    global_shapes : tuple of torch.Size
        Their unconstrained value shapes.
    batch_size : int or None
        Size of the data plate (``None`` if the local sites have none).
    max_plate_nesting : int
        Plates in the model as the per-datapoint samplers count them (the data plate is at
        ``dim=-max_plate_nesting``, a chain plate goes left of it).
    datapoint_shapes : tuple of torch.Size
        Per-datapoint unconstrained shape of each local site (right of the data plate).
    vectorized : bool
        Evaluate all chains in one model call (a chain dimension left of the data
        plate); ``False``: one call per chain, for a model that cannot take that
        dimension (:func:`check_vectorized`).
    """

    local_names: tuple[str, ...]
    local_shapes: dict[str, tuple]
    transforms: dict[str, Any]
    global_names: tuple[str, ...]
    global_shapes: tuple[torch.Size, ...]
    batch_size: int | None = None
    max_plate_nesting: int = 1
    datapoint_shapes: tuple[torch.Size, ...] = ()
    vectorized: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        """The local sites (what the per-datapoint samplers pack)."""
        return self.local_names

    @property
    def shapes(self) -> tuple[torch.Size, ...]:
        return self.datapoint_shapes

    @property
    def size(self) -> int:
        """Length of the packed latent vector of one datapoint."""
        return sum(math.prod(s) for s in self.datapoint_shapes)

    @property
    def global_size(self) -> int:
        return sum(math.prod(s) for s in self.global_shapes)


def trace_prior(model: Callable, args: tuple, kwargs: dict):
    """One trace of ``model(*args, **kwargs)`` drawn from the prior, hidden from enclosing
    handlers and without consuming the caller's random numbers (a resumed run must draw
    exactly what an uninterrupted one draws)."""
    values = (*args, *kwargs.values())
    devices = [a.device for a in values if torch.is_tensor(a) and a.is_cuda]
    with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block():
        return poutine.trace(model).get_trace(*args, **kwargs)


def check_subsampling(sites: dict[str, dict]) -> None:
    """Refuse subsampled plates (``subsample_size=`` or ``subsample=``): they scale the
    log density by :math:`N/n`, a colder chain than the posterior of the rows given."""
    for site in sites.values():
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.full_size != frame.size:
                raise ValueError(
                    f"plate {frame.name!r} subsamples {frame.size} of {frame.full_size} rows "
                    "(subsample_size= or subsample=), which scales the potential by N/n (a "
                    "colder chain); pass the minibatch itself as the model's data with a "
                    f"full-size plate, pyro.plate({frame.name!r}, {frame.size})"
                )


def _transform(fn) -> Any:
    support = fn.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support is constraints.real or support is constraints.real_vector:
        return None
    return biject_to(fn.support)


def _latent_sites(trace) -> dict[str, dict]:
    """The unobserved sample sites of a trace (continuous ones only: one-line refusal)."""
    sites = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete ({type(site['fn']).__name__}); Langevin "
                "samplers and AIS need continuous latents: use an SVI estimator (e.g. "
                "TraceNVIL_ELBO, VIMCO) or condition it out with poutine.condition"
            )
        sites[name] = site
    return sites


def _unconstrained(site, transform) -> Tensor:
    value = site["value"]
    return value if transform is None else transform.inv(value)


def inspect_model(
    model: Callable,
    args: tuple,
    kwargs: dict,
    *,
    local_sites: Sequence[str] | None = None,
    max_plate_nesting: int | None = None,
) -> tuple[ModelSites, Tensor | None]:
    """Trace ``model`` once from the prior; its :class:`ModelSites` and the global sites'
    prior draw (flat, unconstrained; ``None`` without global sites).

    Parameters
    ----------
    local_sites : sequence of str, optional
        The sites an encoder outputs (ALD): the data plates are theirs, any other latent
        inside them is refused, every latent outside them is global. Default: every
        latent site must be local, inside the plate at ``dim=-max_plate_nesting``.
    max_plate_nesting : int, optional
        Where the data plate is when ``local_sites`` is not given (default 1).

    Raises
    ------
    ValueError
        One line naming the problem and the fix: a model without latents, a missing or
        discrete site, a local site missing from ``local_sites``, a subsampled plate, a
        latent outside the data plate (per-datapoint samplers).
    """
    trace = trace_prior(model, args, kwargs)
    check_observations(trace)
    sites = _latent_sites(trace)
    check_subsampling(sites)
    if not sites:
        raise ValueError("the model has no latent sample sites; nothing to infer")
    mpn = 1 if max_plate_nesting is None else int(max_plate_nesting)
    transforms = {name: _transform(site["fn"]) for name, site in sites.items()}
    if local_sites is None:
        local = list(sites)
        outside = [n for n in local if not _data_frames(sites[n], mpn)]
        dims = {f.dim for s in sites.values() for f in s["cond_indep_stack"] if f.vectorized}
        if outside and dims and -mpn not in dims:
            raise ValueError(
                f"max_plate_nesting={mpn} puts the data plate at dim={-mpn}, where the model "
                f"has no plate; pass max_plate_nesting={max(-d for d in dims)} (the data "
                "plate is the outermost)"
            )
        if outside:
            raise ValueError(
                f"latent site {outside[0]!r} is outside the data plate (dim={-mpn}); "
                "per-datapoint samplers need every latent inside it (use AmortizedLangevin, "
                "whose chain also moves global sites, or condition it out)"
            )
    else:
        local = list(local_sites)
        for name in local:
            if name not in sites:
                raise ValueError(
                    f"the model has no sample site {name!r}; pass latent_site= one of its "
                    f"latent sites {list(sites)}"
                )
    data_plates = {f.name for n in local for f in sites[n]["cond_indep_stack"]}
    globals_, global_shapes, values = [], [], []
    for name, site in sites.items():
        if name in local:
            continue
        plates = [f.name for f in site["cond_indep_stack"] if f.name in data_plates]
        if plates:
            raise ValueError(
                f"latent site {name!r} is inside the data plate {plates[0]!r} but not in "
                f"latent_site={local}; add it to latent_site (the encoder outputs it) or "
                "condition it out with poutine.condition"
            )
        u = _unconstrained(site, transforms[name])
        globals_.append(name)
        global_shapes.append(u.shape)
        values.append(u.reshape(-1))
    local_shapes = {n: tuple(_unconstrained(sites[n], transforms[n]).shape) for n in local}
    strict = local_sites is None
    batch, datapoint_shapes = _datapoint_layout(sites, local, transforms, mpn, strict)
    spec = ModelSites(
        tuple(local),
        local_shapes,
        transforms,
        tuple(globals_),
        tuple(global_shapes),
        batch,
        mpn,
        datapoint_shapes,
    )
    return spec, (torch.cat(values) if values else None)


def _data_frames(site, mpn: int) -> list:
    return [f for f in site["cond_indep_stack"] if f.dim == -mpn and f.size is not None]


def _datapoint_layout(sites, local, transforms, mpn: int, strict: bool):
    """The data plate size and each local site's per-datapoint unconstrained shape, when
    every local site sits in one plate at ``dim=-mpn``; else ``(None, ())`` (ALD needs no
    such layout) or, ``strict``, a one-line error."""
    batch, shapes = None, []
    for name in local:
        frames = _data_frames(sites[name], mpn)
        value = _unconstrained(sites[name], transforms[name])
        event_dim = sites[name]["fn"].event_dim
        value = value.reshape((1,) * (mpn + 1 + event_dim - value.dim()) + value.shape)
        size = frames[0].size if frames else None
        if size == -1:  # pyro.plate("data") without a size: the data decide
            size = value.shape[1]
        if size is None or (batch is not None and size != batch):
            if strict:
                raise ValueError(
                    f"latent sites disagree on the data plate size ({batch} vs {size})"
                )
            return None, ()
        batch = size
        shapes.append(value.shape[2:])
    return int(batch), tuple(shapes)


def find_latents(
    model: Callable,
    *args,
    latent_site: str | Sequence[str] | None = None,
    max_plate_nesting: int = 1,
    **kwargs,
) -> ModelSites:
    """:func:`inspect_model` for the per-datapoint samplers (AIS, refinement, DLGM):
    every latent site must be local, inside the data plate at ``dim=-max_plate_nesting``.

    ``latent_site`` names the latent sites to sample (default: every latent site); any
    other latent site is refused (it would be redrawn from its prior at every step)."""
    spec, _ = inspect_model(model, args, kwargs, max_plate_nesting=max_plate_nesting)
    if latent_site is not None:
        wanted = (latent_site,) if isinstance(latent_site, str) else tuple(latent_site)
        for name in wanted:
            if name not in spec.local_names:
                raise ValueError(
                    f"latent site {name!r} not found in the model; its latent sites are "
                    f"{list(spec.local_names)}"
                )
        extra = [n for n in spec.local_names if n not in wanted]
        if extra:
            raise ValueError(
                f"the model has latent sites {extra} besides {list(wanted)}; pass all of them "
                "as latent_site (or latent_site=None)"
            )
    return spec


# -- values -------------------------------------------------------------------------------


def constrain(spec: ModelSites, u: dict[str, Tensor]) -> dict[str, Tensor]:
    """Values in each site's support from unconstrained values."""
    return {
        n: v if spec.transforms.get(n) is None else spec.transforms[n](v) for n, v in u.items()
    }


def unconstrain(spec: ModelSites, z: dict[str, Tensor]) -> dict[str, Tensor]:
    """Unconstrained values from values in each site's support."""
    out = {}
    for name, value in z.items():
        transform = spec.transforms.get(name)
        out[name] = value if transform is None else transform.inv(torch.as_tensor(value))
    return out


def global_values(spec: ModelSites, flat: Tensor | None) -> dict[str, Tensor]:
    """Split the flat unconstrained global values into ``{site: value}``."""
    out, i = {}, 0
    for name, shape in zip(spec.global_names, spec.global_shapes):
        n = math.prod(shape)
        out[name] = flat[i : i + n].view(shape)
        i += n
    return out


def _log_abs_det_jacobians(spec: ModelSites, u: dict, z: dict) -> dict[str, Tensor]:
    return {
        n: spec.transforms[n].log_abs_det_jacobian(u[n], z[n])
        for n in u
        if spec.transforms.get(n) is not None
    }


def _not_param(msg: dict) -> bool:
    return msg["type"] != "param"


def log_joint(model: Callable, spec: ModelSites, u: dict[str, Tensor], args, kwargs) -> Tensor:
    r""":math:`\log p(x, z = T(u)) + \sum_s \log|\det \partial T_s / \partial u_s|` summed
    over the whole program, for unconstrained values ``u`` of every latent site."""
    z = constrain(spec, u)
    # validation off: the Langevin core turns non-finite potentials into rejections, and
    # Pyro's per-site checks cost a host sync per site; params pass the block, so a
    # driver tracing this call sees (and trains) the model's Pyro params
    with poutine.block(hide_fn=_not_param), pyro.validation_enabled(False):
        trace = poutine.trace(poutine.condition(model, data=z)).get_trace(*args, **kwargs)
        value = trace.log_prob_sum()
    for ladj in _log_abs_det_jacobians(spec, u, z).values():
        value = value + ladj.sum()
    return value


# -- per-datapoint evaluation -------------------------------------------------------------


def _chain_plate(num_chains: int, max_plate_nesting: int) -> pyro.plate:
    return pyro.plate(_CHAIN_PLATE, num_chains, dim=-(max_plate_nesting + 1))


def unpack(spec: ModelSites, z: Tensor) -> dict[str, Tensor]:
    """Split a packed ``(C, B, spec.size)`` tensor into ``{site: (C, B, *shape)}``."""
    out, start = {}, 0
    for name, shape in zip(spec.local_names, spec.datapoint_shapes):
        n = math.prod(shape)
        out[name] = z[..., start : start + n].reshape(z.shape[:-1] + shape)
        start += n
    return out


def pack(spec: ModelSites, values: dict[str, Tensor], num_chains: int = 1) -> Tensor:
    """Concatenate ``{site: value}`` into a ``(num_chains, B, spec.size)`` tensor (values of
    shape ``(B, *shape)`` are broadcast over the chains)."""
    parts = []
    for name, shape in zip(spec.local_names, spec.datapoint_shapes):
        v = values[name].expand((num_chains, spec.batch_size) + shape)
        parts.append(v.reshape(num_chains, spec.batch_size, -1))
    return torch.cat(parts, dim=-1)


def sample_prior(model: Callable, spec: ModelSites, num_chains: int, *args, **kwargs) -> Tensor:
    """Packed unconstrained prior draws, shape ``(num_chains, B, spec.size)``."""
    if not spec.vectorized:  # one model call per chain, as the model is written
        return torch.cat([_prior_draw(model, spec, None, args, kwargs) for _ in range(num_chains)])
    return _prior_draw(model, spec, num_chains, args, kwargs)


def _prior_draw(model, spec: ModelSites, num_chains: int | None, args, kwargs) -> Tensor:
    if num_chains is not None:
        model = _chain_plate(num_chains, spec.max_plate_nesting)(model)
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    z = {n: trace.nodes[n]["value"] for n in spec.local_names}
    return pack(spec, unconstrain(spec, z), num_chains or 1)


def _sum_per_datapoint(lp: Tensor, spec: ModelSites, num_chains: int) -> Tensor:
    # left-pad to (C, plate dims...) and sum everything right of the data plate
    lp = lp.reshape((1,) * (spec.max_plate_nesting + 1 - lp.dim()) + lp.shape)
    if lp.dim() > 2:
        lp = lp.sum(dim=tuple(range(2, lp.dim())))
    return lp.expand(num_chains, spec.batch_size)


def log_densities(
    model: Callable, spec: ModelSites, u: Tensor, *args, **kwargs
) -> tuple[Tensor, Tensor]:
    r"""``(log p(u), log p(x | z = T(u)))`` per chain and datapoint, each of shape ``(C, B)``.

    ``u`` is a packed ``(C, B, spec.size)`` tensor of unconstrained values; gradients flow
    to ``u`` and to the model's parameters. The first term sums the latent sites'
    log-probs and log-Jacobians, the second every observed site's (scales and masks
    included). With ``spec.vectorized`` false, one model call per chain.
    """
    if spec.vectorized:
        return _log_densities(model, spec, u, u.shape[0], args, kwargs)
    pairs = [_log_densities(model, spec, u[c], 1, args, kwargs) for c in range(u.shape[0])]
    return torch.cat([p for p, _ in pairs]), torch.cat([lik for _, lik in pairs])


def _log_densities(model, spec: ModelSites, u: Tensor, num_chains: int, args, kwargs):
    values = unpack(spec, u)
    z = constrain(spec, values)
    # no chain plate: the conditioned values broadcast the chain dimension through the
    # model, and an (outer) plate at that dimension may already be allocated
    with poutine.block():
        trace = poutine.trace(poutine.condition(model, data=z)).get_trace(*args, **kwargs)
    log_prior, log_lik = trace_log_densities(trace, spec, num_chains)
    for ladj in _log_abs_det_jacobians(spec, values, z).values():
        log_prior = log_prior + _sum_per_datapoint(ladj, spec, num_chains)
    return log_prior, log_lik


def check_vectorized(model: Callable, spec: ModelSites, *args, **kwargs) -> ModelSites:
    """``spec`` with ``vectorized`` false when the model cannot evaluate a chain dimension
    as it evaluates one chain (a ``BatchNorm`` layer, an ``.expand`` to a fixed shape, a
    reshape that mixes chains): two prior draws, evaluated both ways, must agree to
    floating-point error. Draws none of the caller's random numbers."""
    looped = spec._replace(vectorized=False)
    values = (*args, *kwargs.values())
    devices = [a.device for a in values if torch.is_tensor(a) and a.is_cuda]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        u = sample_prior(model, looped, 2, *args, **kwargs)
        expected = log_densities(model, looped, u, *args, **kwargs)
        try:
            got = log_densities(model, spec, u, *args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception:  # the model cannot take a chain dimension: evaluate per chain
            return looped
    for a, b in zip(got, expected):
        tol = 1000 * torch.finfo(b.dtype).eps * (1 + b.abs())
        if a.shape != b.shape or not bool((((a - b).abs() <= tol) | (a == b)).all()):
            return looped
    return spec


class LatentsCache:
    """The model's latent sites per batch shape (:func:`find_latents`), each checked once
    for a chain dimension (:func:`check_vectorized`): a model written for one draw
    (``.expand`` to the rows, ``BatchNorm``) is then evaluated one chain at a time."""

    def __init__(
        self,
        model: Callable,
        latent_site: str | Sequence[str] | None = None,
        max_plate_nesting: int = 1,
    ):
        self.model, self.latent_site = model, latent_site
        self.max_plate_nesting = max_plate_nesting
        self._specs: dict[tuple, ModelSites] = {}

    def __call__(self, x: Tensor) -> ModelSites:
        key = tuple(x.shape)
        if key not in self._specs:
            spec = find_latents(
                self.model,
                x,
                latent_site=self.latent_site,
                max_plate_nesting=self.max_plate_nesting,
            )
            self._specs[key] = check_vectorized(self.model, spec, x)
        return self._specs[key]


def trace_log_densities(trace, spec: ModelSites, num_chains: int = 1) -> tuple[Tensor, Tensor]:
    """``(log p(z), log p(x | z))``, each ``(num_chains, B)``, from a model trace that has
    values at every site (e.g. a model trace replayed against a guide trace); scales and
    masks applied as in ``Trace.log_prob_sum``."""
    log_prior = log_lik = None
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["fn"].log_prob(site["value"])
        lp = _sum_per_datapoint(scale_and_mask(lp, site["scale"], site["mask"]), spec, num_chains)
        if name in spec.local_names:
            log_prior = lp if log_prior is None else log_prior + lp
        else:
            log_lik = lp if log_lik is None else log_lik + lp
    if log_prior is None or log_lik is None:
        raise ValueError("the model trace lacks its latent or its observed sites")
    return log_prior, log_lik
