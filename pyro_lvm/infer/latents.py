r"""Per-datapoint log densities of a Pyro model at given latent values.

Samplers that work per datapoint (AIS, test-time Langevin refinement, the Hoffman 2017
baseline) need, for latent values :math:`z` and data :math:`x_i`,

.. math::

    \log p(z_i) \quad\text{and}\quad \log p(x_i \mid z_i), \qquad i = 1..B,

separately (AIS anneals only the likelihood), for many chains at once. This module finds
a model's latent sample sites, packs their values into one flat tensor of shape
``(num_chains, B, latent_size)`` (the MCMC position) and evaluates both terms by running
the model conditioned on the unpacked values, which broadcast over an extra chain
dimension left of the data plate, so each chain of each datapoint is an independent
target. Evaluation opens no plate of its own (Pyro allocates plate dimensions globally),
so it also runs inside an outer particle plate, e.g. from a guide called by an
importance-sampling evaluator.

Every latent site must be continuous with real support and live inside the data plate
(the outermost plate, ``dim=-max_plate_nesting``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample

from pyro_lvm.infer.diagnostics import check_observations

__all__ = [
    "LatentSpec",
    "find_latents",
    "sample_prior",
    "log_densities",
    "trace_log_densities",
    "pack",
    "unpack",
]

_CHAIN_PLATE = "_latent_chains"


class LatentSpec(NamedTuple):
    """Which latent sites a model has and how they pack into one vector per datapoint.

    Attributes
    ----------
    names : tuple of str
        Latent site names, in trace order.
    shapes : tuple of torch.Size
        Per-datapoint shape of each site's value (everything right of the data plate).
    batch_size : int
        Size ``B`` of the data plate.
    max_plate_nesting : int
        Plates in the model; the chain plate goes at ``dim=-(max_plate_nesting + 1)``.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    batch_size: int
    max_plate_nesting: int

    @property
    def size(self) -> int:
        """Length of the packed latent vector of one datapoint."""
        return sum(math.prod(s) for s in self.shapes)


def _chain_plate(num_chains: int, max_plate_nesting: int) -> pyro.plate:
    return pyro.plate(_CHAIN_PLATE, num_chains, dim=-(max_plate_nesting + 1))


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real or support is constraints.real_vector


def find_latents(
    model: Callable,
    *args,
    latent_site: str | Sequence[str] | None = None,
    max_plate_nesting: int = 1,
    **kwargs,
) -> LatentSpec:
    """Trace ``model(*args, **kwargs)`` once and describe its latent sites.

    Parameters
    ----------
    latent_site : str or sequence of str, optional
        The latent sites to sample; default every unobserved sample site. Any other
        unobserved site is an error (it would be redrawn from its prior at every step).

    Raises
    ------
    ValueError
        One line naming the problem: a discrete or constrained latent, a latent outside the
        data plate, a missing site, a model without latents.
    """
    # fork the RNG: inspecting the model must not shift the random stream of the caller
    # (a resumed run must draw exactly what an uninterrupted one draws)
    devices = [a.device for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_cuda]
    with torch.random.fork_rng(devices=devices), torch.no_grad(), poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    check_observations(trace)
    latent = [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]
    if not latent:
        raise ValueError("the model has no latent sample sites; nothing to infer")
    if latent_site is not None:
        wanted = (latent_site,) if isinstance(latent_site, str) else tuple(latent_site)
        present = [n for n, _ in latent]
        for name in wanted:
            if name not in present:
                raise ValueError(
                    f"latent site {name!r} not found in the model; its latent sites are {present}"
                )
        extra = [n for n in present if n not in wanted]
        if extra:
            raise ValueError(
                f"the model has latent sites {extra} besides {list(wanted)}; pass all of them "
                "as latent_site (or latent_site=None)"
            )
    names, shapes, batch = [], [], None
    for name, site in latent:
        fn = site["fn"]
        if fn.support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete ({type(fn).__name__}); Langevin samplers "
                "and AIS need continuous latents (use importance sampling for discrete ones)"
            )
        if not _is_real(fn.support):
            raise ValueError(
                f"latent site {name!r} has constrained support {fn.support}; Langevin "
                "samplers need real-valued latents: reparameterize it as a transform of a "
                "Normal"
            )
        frames = [f for f in site["cond_indep_stack"] if f.dim == -max_plate_nesting]
        if not frames or frames[0].size is None:
            raise ValueError(
                f"latent site {name!r} is outside the data plate (dim={-max_plate_nesting}); "
                "per-datapoint samplers need every latent inside it"
            )
        b = frames[0].size
        if batch is not None and b != batch:
            raise ValueError(f"latent sites disagree on the data plate size ({batch} vs {b})")
        batch = b
        value = site["value"]
        value = value.reshape(
            (1,) * (max_plate_nesting + 1 + fn.event_dim - value.dim()) + value.shape
        )
        names.append(name)
        shapes.append(value.shape[2:])
    return LatentSpec(tuple(names), tuple(shapes), int(batch), max_plate_nesting)


def unpack(spec: LatentSpec, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a packed ``(C, B, spec.size)`` tensor into ``{site: (C, B, *shape)}``."""
    out, start = {}, 0
    for name, shape in zip(spec.names, spec.shapes):
        n = math.prod(shape)
        out[name] = z[..., start : start + n].reshape(z.shape[:-1] + shape)
        start += n
    return out


def pack(spec: LatentSpec, values: dict[str, torch.Tensor], num_chains: int = 1) -> torch.Tensor:
    """Concatenate ``{site: value}`` into a ``(num_chains, B, spec.size)`` tensor (values of
    shape ``(B, *shape)`` are broadcast over the chains)."""
    parts = []
    for name, shape in zip(spec.names, spec.shapes):
        v = values[name]
        v = v.expand((num_chains, spec.batch_size) + shape)
        parts.append(v.reshape(num_chains, spec.batch_size, -1))
    return torch.cat(parts, dim=-1)


def sample_prior(
    model: Callable, spec: LatentSpec, num_chains: int, *args, **kwargs
) -> torch.Tensor:
    """Packed prior draws, shape ``(num_chains, B, spec.size)``, by running the model."""
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(_chain_plate(num_chains, spec.max_plate_nesting)(model)).get_trace(
            *args, **kwargs
        )
    return pack(spec, {n: trace.nodes[n]["value"] for n in spec.names}, num_chains)


def _sum_per_datapoint(lp: torch.Tensor, spec: LatentSpec, num_chains: int) -> torch.Tensor:
    # left-pad to (C, plate dims...) and sum everything right of the data plate
    lp = lp.reshape((1,) * (spec.max_plate_nesting + 1 - lp.dim()) + lp.shape)
    if lp.dim() > 2:
        lp = lp.sum(dim=tuple(range(2, lp.dim())))
    return lp.expand(num_chains, spec.batch_size)


def log_densities(
    model: Callable, spec: LatentSpec, z: torch.Tensor, *args, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(log p(z), log p(x | z))`` per chain and datapoint, each of shape ``(C, B)``.

    ``z`` is a packed ``(C, B, spec.size)`` tensor; gradients flow to ``z`` and to the
    model's parameters. The first term sums the latent sites' log-probs, the second every
    observed site's (site scales included).
    """
    num_chains = z.shape[0]
    # no chain plate: the conditioned values broadcast the chain dimension through the
    # model, and an (outer) plate at that dimension may already be allocated
    conditioned = poutine.condition(model, data=unpack(spec, z))
    with poutine.block():
        trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
    return trace_log_densities(trace, spec, num_chains)


def trace_log_densities(
    trace, spec: LatentSpec, num_chains: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(z), log p(x | z))``, each ``(num_chains, B)``, from a model trace that has
    values at every site (e.g. a model trace replayed against a guide trace)."""
    log_prior = log_lik = None
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = _sum_per_datapoint(
            site["fn"].log_prob(site["value"]) * site["scale"], spec, num_chains
        )
        if name in spec.names:
            log_prior = lp if log_prior is None else log_prior + lp
        else:
            log_lik = lp if log_lik is None else log_lik + lp
    if log_prior is None or log_lik is None:
        raise ValueError("the model trace lacks its latent or its observed sites")
    return log_prior, log_lik
