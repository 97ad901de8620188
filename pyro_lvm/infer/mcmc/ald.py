r"""Amortized Langevin dynamics (ALD): the pure transition over a bound batch.

ALD runs **one** MALA chain on encoder parameters :math:`\phi` (by default the weights of
the encoder's heads, the ``nn.Linear`` layers that output the latent sites), so that the
encoder outputs *are* the posterior samples (Taniguchi et al. 2022):

.. math::

    z_i = \Phi\, g(x_i) + b, \qquad
    V(\Phi, u_g) = -\sum_{i=1}^n \log p\bigl(x_i, z_i = \Phi g(x_i) + b, \theta = T_g(u_g)\bigr)
                   - \log\lvert\det \partial T / \partial u\rvert,

with the features :math:`g(x_i)` and the bias held fixed and the global sites'
unconstrained values :math:`u_g` moving beside :math:`\Phi` in the same transition. If the
feature matrix :math:`G` has full row rank, the induced dynamics of the latents is Langevin
preconditioned by :math:`G G^\top`, whose stationary law is :math:`\prod_i p(z_i \mid x_i)`.

The layout follows NumPyro and BlackJAX: :func:`bind_batch` returns an immutable
:class:`ALDBatch` (the chain map, the potential closure, the noise basis), and
:func:`ald_transition` maps ``(state, batch) -> (state, info)`` with
:func:`~pyro_lvm.infer.mcmc.langevin.langevin_step`. What outlives a batch (step size,
dual averaging, global sites) is an :class:`ALDState` value; the chain itself lives in
the encoder's weights (:func:`write_back`). :class:`~pyro_lvm.infer.AmortizedLangevin`
(Pyro's kernel) and :class:`~pyro_lvm.infer.LAE` (training) both drive these functions.

**Temperature.** The potential is the *plain* sum over the rows given (temperature 1 for
the posterior of exactly these rows); subsampled plates are refused.

References
----------
Taniguchi, Iwasawa, Kumagai, Matsuo (2022), "Langevin Autoencoders for Learning Deep
Latent Variable Models", NeurIPS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pyro_lvm.collective import all_gather_cat
from pyro_lvm.infer import sites as S
from pyro_lvm.infer.diagnostics import DivergenceError
from pyro_lvm.infer.mcmc.adaptation import (
    DualAveragingState,
    dual_averaging_init,
    dual_averaging_step,
    find_step_size,
)
from pyro_lvm.infer.mcmc.chain import ChainCache, ChainMap, ChainSpec, chain_map
from pyro_lvm.infer.mcmc.langevin import (
    LangevinInfo,
    LangevinState,
    ReduceFn,
    langevin_init,
    langevin_proposal,
    langevin_step,
    mala_log_accept_ratio,
    potential_and_grad,
    standard_normal,
)

__all__ = [
    "ALDBatch",
    "ALDState",
    "PotentialOf",
    "ald_init",
    "ald_transition",
    "check_options",
    "ald_adapt",
    "bind_batch",
    "initial_step_size",
    "row_space_basis",
    "write_back",
]

#: ``potential_of(u, args, kwargs) -> V``: the potential at unconstrained site values
PotentialOf = Callable[[dict, tuple, dict], Tensor]


class ALDState(NamedTuple):
    """What the chain carries from batch to batch besides the encoder's weights.

    Attributes
    ----------
    step_size : float or None
        The step size of the next transition (``None``: to be found).
    adapt : DualAveragingState or None
        Dual-averaging state (``None``: not adapting).
    t : int
        Transitions so far.
    globals : Tensor or None
        The global sites' flat unconstrained values.
    """

    step_size: float | None = None
    adapt: DualAveragingState | None = None
    t: int = 0
    globals: Tensor | None = None


class ALDBatch(NamedTuple):
    """One bound batch: what a transition needs, as values.

    Attributes
    ----------
    args, kwargs : tuple, dict
        The model's arguments.
    sites : ModelSites
        The model's latent sites.
    chain : ChainMap
        Chain coordinates <-> encoder parameters and local latents on this batch.
    potential_fn : callable
        The flat position (chain coordinates, then global values) -> :math:`V`.
    potential_of : callable
        ``potential_of(u, args, kwargs)``: :math:`V` at unconstrained site values.
    noise_basis : tuple or None
        Per head, an orthonormal basis of its features' row space (``project_noise``).
    """

    args: tuple
    kwargs: dict
    sites: S.ModelSites
    chain: ChainMap
    potential_fn: Callable[[Tensor], Tensor]
    potential_of: PotentialOf
    noise_basis: tuple[Tensor | None, ...] | None = None

    @property
    def chain_size(self) -> int:
        return self.chain.start.numel()


def check_options(
    latent_site, encoder, params, step_size, target_accept_prob, precondition, adapt_window
) -> tuple[str, ...]:
    """One-line errors for impossible kernel options; the latent site names."""
    sites = (latent_site,) if isinstance(latent_site, str) else tuple(latent_site)
    named = dict(encoder.named_parameters()) if isinstance(encoder, nn.Module) else {}
    missing = None if params is None else [p for p in params if p not in named] or None
    checks = [
        (
            sites and all(isinstance(s, str) for s in sites) and len(set(sites)) == len(sites),
            f"latent_site must be a site name or a sequence of distinct names, got "
            f"{latent_site!r}",
        ),
        (step_size is None or step_size > 0, f"step_size must be positive, got {step_size}"),
        (
            0.0 < target_accept_prob < 1.0,
            f"target_accept_prob must be in (0, 1), got {target_accept_prob}",
        ),
        (
            precondition is None or precondition > 0,
            f"precondition (a damping) must be positive or None, got {precondition}",
        ),
        (
            adapt_window is None or adapt_window >= 1,
            f"adapt_window must be a positive integer, got {adapt_window}",
        ),
        (
            isinstance(encoder, nn.Module),
            f"encoder must be an nn.Module, got {type(encoder).__name__}",
        ),
        (
            params is None or (list(params) and not missing),
            f"params {missing or list(params or [])} are not parameters of the encoder; choose "
            f"from {sorted(named)}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return sites


# -- binding a batch -----------------------------------------------------------------------


def row_space_basis(features: Tensor, rtol: float = 1e-9) -> Tensor:
    """An orthonormal basis (columns, ``(H, r)``) of the span of the rows of ``features``.

    Rank-revealing, from the eigendecomposition of the ``n x n`` Gram matrix in double
    precision: eigenvalues below ``rtol`` times the largest are dropped, so exact linear
    dependencies contribute no direction picked by rounding, and the basis is a function
    of the span alone (the same on every rank of a data-parallel run).
    """
    g = features.double()
    eigenvalues, vectors = torch.linalg.eigh(g @ g.T)
    keep = eigenvalues > eigenvalues[-1] * rtol
    return ((g.T @ vectors[:, keep]) / eigenvalues[keep].sqrt()).to(features.dtype)


def _noise_basis(chain: ChainMap) -> tuple[Tensor | None, ...]:
    if not chain.matmul:
        raise ValueError(
            "project_noise needs every latent site to be an nn.Linear head output (or a "
            "column slice of one); drop project_noise="
        )
    out = []
    for g in chain.features:
        # data parallel: the union batch's span, identical on every rank (as the noise)
        g = all_gather_cat(g.detach())
        out.append(None if g.shape[0] >= g.shape[1] else row_space_basis(g))
    return tuple(out)


def _projector(chain: ChainMap, basis: tuple[Tensor | None, ...]) -> Callable[[Tensor], Tensor]:
    """The projection of a chain vector onto each head's feature row space."""
    shapes = [p.shape for p in chain.params_of(chain.start)]
    sizes = [s.numel() for s in shapes]

    def project(c: Tensor) -> Tensor:
        parts = []
        for part, shape, q in zip(c.split(sizes), shapes, basis):
            parts.append(part if q is None else ((part.view(shape) @ q) @ q.T).reshape(-1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return project


def _potential_fn(sites, local_values, chain_size, args, kwargs, potential_of):
    def potential_fn(position: Tensor) -> Tensor:
        u = local_values(position[:chain_size] if sites.global_names else position)
        if sites.global_names:
            u = {**u, **S.global_values(sites, position[chain_size:])}
        return potential_of(u, args, kwargs)

    return potential_fn


def bind_batch(
    model: Callable,
    encoder: nn.Module,
    spec: ChainSpec,
    sites: S.ModelSites,
    cache: ChainCache,
    x: Tensor,
    args: tuple,
    kwargs: dict,
    *,
    potential_of: PotentialOf,
    keep_graph: bool = False,
    precondition: float | None = None,
    project_noise: bool = False,
) -> ALDBatch:
    """Bind the batch: the chain map at the encoder's current weights and the potential
    closure (see the module docstring); one-line errors for encoder outputs that do not
    match the sites.

    With ``keep_graph`` the features keep their autograd graph to the network parameters
    (what :class:`~pyro_lvm.infer.LAE` backpropagates)."""
    chain = chain_map(
        spec,
        encoder,
        x,
        sites.local_names,
        cache,
        keep_graph=keep_graph,
        precondition=precondition,
    )
    basis = _noise_basis(chain) if project_noise and precondition is None else None
    local_values = chain.local_values
    if basis is not None and any(q is not None for q in basis):
        project, start = _projector(chain, basis), chain.start

        def local_values(c: Tensor) -> dict[str, Tensor]:
            # the potential at the projected move: the drift is projected too, so the
            # chain is exactly MALA on the affine subspace through the start
            return chain.local_values(start + project(c - start))

    key = ("shapes", tuple(x.shape))
    if key not in cache.verified:
        with torch.no_grad():
            _check_shapes(sites, chain.local_values(chain.start))
        cache.verified.add(key)
    fn = _potential_fn(sites, local_values, chain.start.numel(), args, kwargs, potential_of)
    return ALDBatch(args, kwargs, sites, chain, fn, potential_of, basis)


def _check_shapes(sites: S.ModelSites, u: dict[str, Tensor]) -> None:
    for name in sites.local_names:
        # the sites were traced on one batch: compare everything right of the batch dim
        expected, got = sites.local_shapes[name], tuple(u[name].shape)
        if got[1:] != expected[1:] or len(got) != len(expected):
            raise ValueError(
                f"the encoder outputs shape {got} but latent site {name!r} has shape "
                f"{expected}; make encoder(x) match the latent site"
            )


def start_position(batch: ALDBatch, state: ALDState) -> Tensor:
    """The flat position at the encoder's weights: chain coordinates, then globals."""
    start = batch.chain.start
    return start if state.globals is None else torch.cat([start, state.globals.to(start)])


# -- transitions ----------------------------------------------------------------------------


def ald_init(
    batch: ALDBatch,
    state: ALDState,
    *,
    keep_graph: bool = False,
    reduce_fn: ReduceFn | None = None,
) -> LangevinState:
    """The Langevin state at the encoder's current weights; a non-finite potential or
    gradient there is a one-line :class:`~pyro_lvm.infer.DivergenceError`."""
    langevin = langevin_init(
        start_position(batch, state),
        batch.potential_fn,
        keep_graph=keep_graph,
        reduce_fn=reduce_fn,
    )
    # one sum and one sync: finite iff the potential and every gradient entry are
    potential = langevin.potential.detach()
    if not math.isfinite(float(langevin.grad.sum() + potential.sum())):
        raise DivergenceError(
            f"the potential at the current encoder weights is {float(potential.sum())} on "
            "this batch: the model or encoder produced NaN/inf (check the data and the "
            "network outputs; in training, lower the learning rate or re-initialise)"
        )
    return langevin


def _noise(batch: ALDBatch, position: Tensor, generator) -> Tensor | None:
    """The proposal's standard normal draw, projected (``project_noise``), or ``None``."""
    if batch.noise_basis is None:
        return None
    noise = standard_normal(position, generator)
    size = batch.chain_size
    chain = _projector(batch.chain, batch.noise_basis)(noise[:size])
    return chain if size == noise.numel() else torch.cat([chain, noise[size:]])


def ald_transition(
    langevin: LangevinState,
    batch: ALDBatch,
    step_size: float,
    *,
    mh: bool = True,
    keep_graph: bool = False,
    generator: torch.Generator | None = None,
    reduce_fn: ReduceFn | None = None,
) -> tuple[LangevinState, LangevinInfo]:
    """One MALA (``mh=True``) or ULA transition of the chain on the bound batch."""
    return langevin_step(
        langevin,
        batch.potential_fn,
        step_size,
        mh=mh,
        noise=_noise(batch, langevin.position, generator),
        keep_graph=keep_graph,
        generator=generator,
        reduce_fn=reduce_fn,
    )


def ald_adapt(
    state: ALDState,
    accept_prob: float,
    target_accept_prob: float,
    *,
    adapt_window: int | None = None,
    final: bool = False,
) -> ALDState:
    """One dual-averaging update of the step size (``final``: freeze the average)."""
    if state.adapt is None:
        return state
    adapt, step_size = dual_averaging_step(
        state.adapt, accept_prob, target_accept_prob, max_t=adapt_window, final=final
    )
    return state._replace(adapt=adapt, step_size=float(step_size))


def initial_step_size(
    langevin: LangevinState,
    batch: ALDBatch,
    target_accept_prob: float,
    *,
    generator: torch.Generator | None = None,
    reduce_fn: ReduceFn | None = None,
) -> float:
    """A step size from a search at the current state with one fixed noise draw
    (:func:`~pyro_lvm.infer.mcmc.adaptation.find_step_size`); the chain does not move."""
    state = LangevinState(langevin.position, langevin.potential.detach(), langevin.grad)
    noise = _noise(batch, state.position, generator)
    if noise is None:
        noise = standard_normal(state.position, generator)

    def log_accept(eta: float) -> float:
        position = langevin_proposal(state, eta, noise)
        potential, grad = potential_and_grad(batch.potential_fn, position, reduce_fn=reduce_fn)
        return float(mala_log_accept_ratio(state, LangevinState(position, potential, grad), eta))

    return find_step_size(log_accept, target_accept_prob)


def start_adaptation(state: ALDState, step_size: float, adapt: bool) -> ALDState:
    """The state with ``step_size`` and, when adapting, fresh dual averaging from it."""
    return state._replace(
        step_size=float(step_size), adapt=dual_averaging_init(step_size) if adapt else None
    )


def write_back(
    langevin: LangevinState, batch: ALDBatch, params: Sequence[nn.Parameter]
) -> Tensor | None:
    """Write the chain's position into the encoder's chain parameters; the global sites'
    values (flat, detached; ``None`` without global sites)."""
    size, position = batch.chain_size, langevin.position
    chain = position if size == position.numel() else position[:size]
    with torch.no_grad():
        for p, value in zip(params, batch.chain.params_of(chain)):
            p.copy_(value)
    return position[size:].detach() if batch.sites.global_names else None


def local_latents(langevin: LangevinState, batch: ALDBatch) -> dict[str, Tensor]:
    """Every latent site's constrained value at the state (detached copies)."""
    position = langevin.position
    with torch.no_grad():
        u = batch.chain.local_values(position[: batch.chain_size])
        if batch.sites.global_names:
            u = {**u, **S.global_values(batch.sites, position[batch.chain_size :])}
        return {n: v.detach().clone() for n, v in S.constrain(batch.sites, u).items()}
