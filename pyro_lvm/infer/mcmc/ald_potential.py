r"""ALD's view of a Pyro model: which sites it samples, and the per-batch potential.

:func:`inspect_model` traces the model once from the prior and returns a
:class:`SiteSpec`: the local latent sites (inside the data plate; the encoder outputs
them), each site's bijection to Pyro's unconstrained space (``biject_to(site.support)``),
and the *global* latent sites (outside every plate of the local sites), which join the
chain state directly. :func:`potential_fn_gen` then builds, per batch, the closure

.. math::

    V(\phi, u_g) = -\log p\bigl(x, z = T(u(\phi)), \theta = T_g(u_g)\bigr)
                   - \sum_s \log\bigl|\det \partial T_s / \partial u_s\bigr|,

a function of the flat position :math:`(\phi, u_g)` only, in the way NumPyro's
``potential_fn_gen(*model_args)`` closes over the model's arguments (instead of a kernel
swapping its bound arguments in and out).
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
from pyro.poutine.util import site_is_subsample
from torch import Tensor

__all__ = [
    "SiteSpec",
    "inspect_model",
    "check_subsampling",
    "constrain",
    "unconstrain",
    "global_values",
    "log_joint",
    "potential",
    "potential_fn_gen",
]


class SiteSpec(NamedTuple):
    """The latent sites ALD samples.

    Attributes
    ----------
    local_names : tuple of str
        The local latent sites (the encoder's outputs).
    local_shapes : dict
        Each local site's unconstrained value shape (with the batch dimension).
    transforms : dict
        ``biject_to(site.support)`` per latent site, ``None`` for real supports.
    global_names : tuple of str
        Global latent sites (outside the local sites' plates), in trace order.
    global_shapes : tuple of torch.Size
        Their unconstrained value shapes.
    """

    local_names: tuple[str, ...]
    local_shapes: dict[str, tuple]
    transforms: dict[str, Any]
    global_names: tuple[str, ...]
    global_shapes: tuple[torch.Size, ...]

    @property
    def global_size(self) -> int:
        return sum(math.prod(s) for s in self.global_shapes)


def _not_param(msg: dict) -> bool:
    return msg["type"] != "param"


def check_subsampling(sites: dict[str, dict]) -> None:
    """Refuse subsampled plates (``subsample_size=`` or ``subsample=``): they scale the
    potential by :math:`N/n`, a colder chain than the posterior of the rows given."""
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
    return None if support is constraints.real else biject_to(fn.support)


def inspect_model(
    model: Callable, latent_sites: Sequence[str], args: tuple, kwargs: dict
) -> tuple[SiteSpec, Tensor | None]:
    """Trace ``model`` once from the prior; the :class:`SiteSpec` and the global sites'
    prior draw (flat, unconstrained; ``None`` without global sites).

    Raises
    ------
    ValueError
        One line naming the problem and the fix: a missing or discrete site, a local
        site missing from ``latent_sites``, a subsampled plate.
    """
    # sampling from the prior must not consume random numbers: a resumed run has to
    # continue exactly as an uninterrupted one (which did this check long ago)
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    sites = {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }
    latent = [n for n, s in sites.items() if not s["is_observed"]]
    for name in latent_sites:
        if name not in sites:
            raise ValueError(
                f"the model has no sample site {name!r}; pass latent_site= one of its "
                f"latent sites {latent}"
            )
    check_subsampling(sites)
    data_plates = {f.name for n in latent_sites for f in sites[n]["cond_indep_stack"]}
    transforms, local_shapes, names, shapes, values = {}, {}, [], [], []
    for name in latent:
        fn = sites[name]["fn"]
        if fn.support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete ({type(fn).__name__}); Langevin "
                "dynamics needs continuous latents: use an SVI estimator (e.g. "
                "TraceNVIL_ELBO) or condition it out with poutine.condition"
            )
        transforms[name] = _transform(fn)
        if name in latent_sites:
            shape = tuple(fn.batch_shape + fn.event_shape)
            local_shapes[name] = tuple(biject_to(fn.support).inv.forward_shape(shape))
            continue
        plates = [f.name for f in sites[name]["cond_indep_stack"] if f.name in data_plates]
        if plates:
            raise ValueError(
                f"latent site {name!r} is inside the data plate {plates[0]!r} but not in "
                f"latent_site={list(latent_sites)}; add it to latent_site (the encoder "
                "outputs it) or condition it out with poutine.condition"
            )
        u = biject_to(fn.support).inv(sites[name]["value"])
        names.append(name)
        shapes.append(u.shape)
        values.append(u.reshape(-1))
    spec = SiteSpec(tuple(latent_sites), local_shapes, transforms, tuple(names), tuple(shapes))
    return spec, (torch.cat(values) if values else None)


def constrain(spec: SiteSpec, u: dict[str, Tensor]) -> dict[str, Tensor]:
    """Values in each site's support from unconstrained values."""
    return {
        n: v if spec.transforms.get(n) is None else spec.transforms[n](v) for n, v in u.items()
    }


def unconstrain(spec: SiteSpec, z: dict[str, Tensor]) -> dict[str, Tensor]:
    """Unconstrained values from values in each site's support."""
    out = {}
    for name, value in z.items():
        transform = spec.transforms.get(name)
        out[name] = value if transform is None else transform.inv(torch.as_tensor(value))
    return out


def global_values(spec: SiteSpec, flat: Tensor | None) -> dict[str, Tensor]:
    """Split the flat unconstrained global values into ``{site: value}``."""
    out, i = {}, 0
    for name, shape in zip(spec.global_names, spec.global_shapes):
        n = math.prod(shape)
        out[name] = flat[i : i + n].view(shape)
        i += n
    return out


def log_joint(model: Callable, spec: SiteSpec, u: dict[str, Tensor], args, kwargs) -> Tensor:
    r""":math:`\log p(x, z = T(u)) + \sum_s \log|\det \partial T_s / \partial u_s|` for
    unconstrained values ``u`` of every latent site."""
    z = constrain(spec, u)
    # validation off: the Langevin core itself turns non-finite potentials into
    # rejections, and Pyro's per-site NaN/inf checks cost a sync per site;
    # params pass the block: LAE traces them to train the model's Pyro params
    with poutine.block(hide_fn=_not_param), pyro.validation_enabled(False):
        trace = poutine.trace(poutine.condition(model, data=z)).get_trace(*args, **kwargs)
        value = trace.log_prob_sum()
    for name, transform in spec.transforms.items():
        if transform is not None:
            value = value + transform.log_abs_det_jacobian(u[name], z[name]).sum()
    return value


def potential(model: Callable, spec: SiteSpec, u: dict[str, Tensor], args, kwargs) -> Tensor:
    """The potential :math:`V = -\\log p(x, z = T(u)) - \\log|\\det \\partial T / \\partial u|`
    (:func:`log_joint` negated: compiled whole, the negation cancels the one
    ``torch.distributions`` applies inside every log-density)."""
    return -log_joint(model, spec, u, args, kwargs)


def check_shapes(spec: SiteSpec, u: dict[str, Tensor]) -> None:
    """One-line error if the encoder's outputs do not have the sites' shapes."""
    for name in spec.local_names:
        # the spec was traced on one batch: compare everything right of the batch dim
        expected, got = spec.local_shapes[name], tuple(u[name].shape)
        if got[1:] != expected[1:] or len(got) != len(expected):
            raise ValueError(
                f"the encoder outputs shape {got} but latent site {name!r} has shape "
                f"{expected}; make encoder(x) match the latent site"
            )


def potential_fn_gen(
    model: Callable,
    spec: SiteSpec,
    local_values: Callable[[Tensor], dict[str, Tensor]],
    chain_size: int,
    args: tuple,
    kwargs: dict,
    potential_of: Callable[[dict, tuple, dict], Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """The potential of one batch as a function of the flat position alone: the chain
    part (the first ``chain_size`` entries) gives the local sites through
    ``local_values``, the rest are the global sites' unconstrained values.

    ``potential_of(u, args, kwargs)`` replaces :func:`potential` of ``model`` (e.g. its
    compiled form, :class:`~pyro_lvm.infer.compile.CompiledFunction`)."""
    if potential_of is None:

        def potential_of(u, args, kwargs):
            return potential(model, spec, u, args, kwargs)

    def potential_fn(position: Tensor) -> Tensor:
        u = local_values(position[:chain_size] if spec.global_names else position)
        if spec.global_names:
            u = {**u, **global_values(spec, position[chain_size:])}
        return potential_of(u, args, kwargs)

    return potential_fn
