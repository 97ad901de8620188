r"""Amortized Langevin dynamics (ALD) as a Pyro MCMC kernel.

Plain Langevin dynamics runs one chain per datapoint on its latent :math:`z_i`. ALD runs
**one** chain on the weight :math:`\Phi` of an encoder's final linear layer, so that the
encoder outputs *are* the posterior samples (Taniguchi et al. 2022):

.. math::

    z_i = \Phi\, g(x_i) + b, \qquad
    V(\Phi) = -\sum_{i=1}^n \log p\bigl(x_i, z_i = \Phi g(x_i) + b\bigr),

with the features :math:`g(x_i)` (the encoder trunk) and the bias :math:`b` held fixed.
Each transition is a MALA step on :math:`\Phi` (see :mod:`pyro_lvm.infer.mcmc.langevin`) with
one accept/reject decision for the whole batch. If the feature matrix :math:`G` (rows
:math:`g(x_i)^\top`) has full row rank :math:`n` (so the trunk must be at least as wide
as the batch), the induced dynamics of :math:`(z_1, \dots, z_n)` is Langevin dynamics
preconditioned by :math:`G G^\top`, whose stationary law is
:math:`\prod_i p(z_i \mid x_i)`: the encoder outputs along the chain are exact posterior
samples. With fewer features than datapoints some posteriors collapse; the kernel warns
(:class:`RankConditionWarning`).

**Temperature.** The potential is the *plain* sum over the rows given, as in the paper:
temperature 1 for the posterior of exactly these rows. A subsampled ``pyro.plate`` would
multiply the log-likelihood by :math:`N/n` and sample a colder posterior, so the kernel
rejects models whose plates subsample: pass the minibatch you have, with a full-size plate.

The potential is computed from the user's own Pyro model, conditioned on
``latent_site = encoder(x)`` and traced inside :func:`pyro.poutine.block`; the model needs
no changes to be trained with SVI (VAE) or with ALD (:class:`~pyro_lvm.infer.lae.LAE`).

**Layout.** This class is the shell: per batch it builds the chain map
(:mod:`~pyro_lvm.infer.mcmc.chain`) and the potential closure
(:mod:`~pyro_lvm.infer.mcmc.ald_potential`), and a transition is one call of the pure
:func:`~pyro_lvm.infer.mcmc.langevin.langevin_step` followed by
:func:`~pyro_lvm.infer.mcmc.adaptation.dual_averaging_step`. Step size, acceptance and
adaptation are Python floats; the accept decision is the one host sync per transition on
CUDA (see :mod:`~pyro_lvm.infer.mcmc.mh`).

References
----------
Taniguchi, Iwasawa, Kumagai, Matsuo (2022), "Langevin Autoencoders for Learning Deep
Latent Variable Models", NeurIPS.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from pyro import poutine
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor, nn

from pyro_lvm.collective import all_gather_cat
from pyro_lvm.infer.compile import CompiledFunction
from pyro_lvm.infer.diagnostics import DivergenceError
from pyro_lvm.infer.mcmc import ald_potential as ap
from pyro_lvm.infer.mcmc.adaptation import (
    DualAveragingState,
    dual_averaging_init,
    dual_averaging_step,
    find_step_size,
)
from pyro_lvm.infer.mcmc.chain import (
    ChainMap,
    RankConditionWarning,
    chain_map,
    final_linear,
    head_slices,
    run_capturing,
    solve_head_weight,
)
from pyro_lvm.infer.mcmc.langevin import (
    LangevinInfo,
    LangevinState,
    langevin_init,
    langevin_proposal,
    langevin_step,
    mala_log_accept_ratio,
    potential_and_grad,
    standard_normal,
)

__all__ = ["AmortizedLangevin", "RankConditionWarning"]


def row_space_basis(features: Tensor, rtol: float = 1e-9) -> Tensor:
    """An orthonormal basis (columns, ``(H, r)``) of the span of the rows of ``features``.

    Rank-revealing, from the eigendecomposition of the ``n x n`` Gram matrix in double
    precision: eigenvalues below ``rtol`` times the largest are dropped, so the exact
    linear dependencies (centred features sum to zero over the batch: rank ``n - 1``)
    contribute no direction picked by rounding, and the basis is a function of the span
    alone (the same on every rank of a data-parallel run).
    """
    g = features.double()
    eigenvalues, vectors = torch.linalg.eigh(g @ g.T)
    keep = eigenvalues > eigenvalues[-1] * rtol
    return ((g.T @ vectors[:, keep]) / eigenvalues[keep].sqrt()).to(features.dtype)


def _on_span(
    local_values: Callable[[Tensor], dict[str, Tensor]], start: Tensor, basis: Tensor
) -> Callable[[Tensor], dict[str, Tensor]]:
    """``local_values`` at the start plus the move projected onto the basis's span.

    Equal to ``local_values`` on the affine subspace the projected chain lives on, and its
    gradient is the projected gradient, so the drift stays in the subspace too: MALA on
    the subspace exactly, also along the directions :func:`row_space_basis` drops.
    """
    width = basis.shape[0]

    def projected(c: Tensor) -> dict[str, Tensor]:
        move = (c - start).view(-1, width)
        return local_values(start + ((move @ basis) @ basis.T).reshape(-1))

    return projected


class _Batch(NamedTuple):
    """What one bound batch needs: the model arguments, the chain map, the potential."""

    args: tuple
    kwargs: dict
    chain: ChainMap
    potential_fn: Callable[[Tensor], Tensor]
    #: orthonormal basis (columns) of the batch's feature row space, for project_noise
    noise_basis: Tensor | None = None


def _fresh_stats() -> dict[str, Any]:
    return {"accept_prob": 0.0, "accepted": 0.0, "n": 0, "divergences": []}


class AmortizedLangevin(MCMCKernel):
    r"""MALA on an encoder's final-layer weight; its outputs are posterior samples.

    Parameters
    ----------
    model : callable
        Pyro model ``model(x, ...)`` whose local latent sites ``latent_site`` lie inside a
        (full-size, not subsampled) data plate over the rows of ``x``. Any other
        unobserved site outside that plate is a *global* latent: it joins the chain state
        (its unconstrained value) and moves by the same MALA transition, and
        ``get_samples()`` returns it too. Latent sites may have constrained supports: the
        potential works in Pyro's unconstrained space (``biject_to(site.support)``) and
        carries the log-abs-det-Jacobian; samples are constrained values.
    encoder : nn.Module
        ``encoder(x)`` returns the local sites' unconstrained values: a Tensor of the
        site's shape ``(n, latent_dim)`` for one site, a dict ``{site: value}`` for
        several. It receives the first positional argument given to the model (see
        ``encoder_input``).
    latent_site : str or sequence of str
        Name(s) of the local latent sample sites. With several sites the default chain
        state is still the final ``nn.Linear`` (e.g. one head whose columns are split into
        the sites); with one head per site name each head's weight in ``params``.
    step_size : float, optional
        Initial MALA step size :math:`\eta`. By default it is found at setup by doubling or
        halving :math:`10^{-3}` until one proposal's acceptance crosses the target.
    mh : bool
        Metropolis-Hastings correction (MALA); ``False`` gives unadjusted Langevin (ULA).
    adapt_step_size : bool
        Dual averaging of :math:`\log\eta` towards ``target_accept_prob`` during warmup
        (under :class:`pyro.infer.MCMC`) or during every transition when asked to
        (:class:`~pyro_lvm.infer.lae.LAE`).
    target_accept_prob : float
        Target acceptance probability (0.574 is optimal for MALA in high dimension).
    params : sequence of str, optional
        Names (as in ``encoder.named_parameters()``) of the parameters that form the chain
        state, instead of the final ``nn.Linear``'s weight. Then the whole encoder is
        re-evaluated at every proposal, after a check (once per batch shape) that its
        output is affine in them.
    precondition : float, optional
        Feature preconditioning with this relative damping :math:`\lambda` (e.g. 1e-3):
        per batch the chain moves :math:`\Phi = \Phi_0 + U A` with
        :math:`A = (G G^\top + \lambda\bar e I)^{-1} G` (:math:`\bar e` the mean
        eigenvalue of :math:`G G^\top`), and MALA runs on :math:`U` (one column per
        datapoint). Then :math:`z = z_0 + P U^\top` with
        :math:`P = G G^\top (G G^\top + \lambda\bar e I)^{-1} \approx I`: per-datapoint
        Langevin in latent space, whatever the conditioning of the features. A fixed linear
        reparametrization per batch, so the stationary law of the latents is unchanged.
        Without it, the step size is set by the stiffest direction of :math:`G G^\top`
        (typically the mode shared by all datapoints, as trained features are far from
        centred) and per-datapoint directions barely move. Works for any encoder with
        the default chain state (the features are captured by a hook on the final
        ``nn.Linear``); see ``docs/langevin.md`` for when to turn it on.
    project_noise : bool
        Draw the proposal noise of :math:`\Phi` in the row space of the batch's features
        only: :math:`\xi \mapsto \xi Q Q^\top` with :math:`Q` an orthonormal basis of
        the span of the rows of :math:`G` (:func:`row_space_basis`, one ``n x n``
        eigendecomposition per batch; directions with a singular value below
        :math:`3 \times 10^{-5}` of the largest, float32 rounding level, count as
        absent; the potential is evaluated at the projected move, so the drift is
        projected too and the chain is exactly MALA on that subspace). The latents
        :math:`z_i = \Phi g_i + b` of the batch, the potential's gradient and hence the
        chain's law on them are exactly unchanged (noise orthogonal to every
        :math:`g_i` never reaches a :math:`z_i`, and the MALA correction is the same on
        the subspace); what stops is the free random walk of :math:`\Phi` in the
        directions the batch does not constrain, which moves the latents of every *other*
        datapoint and inflates :math:`\lVert\Phi\rVert` over training. Needs the default
        chain state with every latent a slice of the head's one output. Data parallel,
        the span is the union batch's (the features are gathered from every rank once
        per batch). See ``docs/langevin.md`` for the measured effect on LAE
        training.
    encoder_input : callable, optional
        ``encoder_input(*model_args, **model_kwargs)`` returns the encoder's input; by
        default the model's first positional argument (use it when the data are a
        keyword argument or need reshaping).
    adapt_window : int, optional
        Cap on the dual-averaging counter (see
        :func:`~pyro_lvm.infer.mcmc.adaptation.dual_averaging_update`): keeps adaptation
        responsive when the target keeps changing (training). ``None`` (default for
        plain MCMC) is textbook dual averaging.

    generator : torch.Generator, optional
        Source of the proposal noise and the MH uniform (default: the global RNG); with
        ``reduce_fn`` the hook for distributed chains (see :mod:`pyro_lvm.infer.mcmc`).
    reduce_fn : callable, optional
        ``reduce_fn(potential, grad) -> (potential, grad)``, local to global values of the
        potential and its gradient w.r.t. the chain position (default: identity).
    jit_compile : bool
        Trace the model's log joint once per batch signature with :func:`torch.jit.trace`
        and replay it (:class:`~pyro_lvm.infer.compile.CompiledFunction`), as Pyro's
        ``HMC(jit_compile=True)``: removes the effect-handler cost of every potential
        evaluation (about a third of a digits-size LAE step). Only for models whose
        structure does not depend on tensor values.

    Examples
    --------
    >>> kernel = AmortizedLangevin(lvm.model, encoder)          # doctest: +SKIP
    >>> mcmc = pyro.infer.MCMC(kernel, num_samples=500, warmup_steps=200)  # doctest: +SKIP
    >>> mcmc.run(x)                                             # doctest: +SKIP
    >>> z = mcmc.get_samples()["z"]        # (500, n, latent_dim)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Callable,
        encoder: nn.Module,
        *,
        latent_site: str | Sequence[str] = "z",
        step_size: float | None = None,
        mh: bool = True,
        adapt_step_size: bool = True,
        target_accept_prob: float = 0.574,
        params: Sequence[str] | None = None,
        adapt_window: int | None = None,
        precondition: float | None = None,
        encoder_input: Callable[..., Tensor] | None = None,
        generator: torch.Generator | None = None,
        reduce_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        jit_compile: bool = False,
        project_noise: bool = False,
    ):
        sites = (latent_site,) if isinstance(latent_site, str) else tuple(latent_site)
        if not sites or not all(isinstance(s, str) for s in sites) or len(set(sites)) < len(sites):
            raise ValueError(
                f"latent_site must be a site name or a sequence of distinct names, got "
                f"{latent_site!r}"
            )
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        if not 0.0 < target_accept_prob < 1.0:
            raise ValueError(f"target_accept_prob must be in (0, 1), got {target_accept_prob}")
        if precondition is not None and not precondition > 0:
            raise ValueError(f"precondition (a damping) must be positive, got {precondition}")
        if adapt_window is not None and adapt_window < 1:
            raise ValueError(f"adapt_window must be a positive integer, got {adapt_window}")
        if not isinstance(encoder, nn.Module):
            raise ValueError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        self.model, self.encoder = model, encoder
        self.latent_site, self.latent_sites = latent_site, sites
        self.mh, self.adapt_step_size = mh, adapt_step_size
        self.target_accept_prob, self.adapt_window = target_accept_prob, adapt_window
        self.precondition, self.encoder_input = precondition, encoder_input
        self.generator, self.reduce_fn = generator, reduce_fn
        self.jit_compile = bool(jit_compile)
        self._potential: CompiledFunction | None = None  # built with the site spec
        self._init_step_size = None if step_size is None else float(step_size)
        self._head, self.param_names = self._chain_parameters(encoder, params)
        named = dict(encoder.named_parameters())
        self.chain_params: list[nn.Parameter] = [named[p] for p in self.param_names]
        if precondition is not None and self._head is None:
            raise ValueError(
                "precondition needs the chain to be the final nn.Linear weight "
                "(params=None); drop params= or precondition="
            )
        self.project_noise = bool(project_noise)
        if self.project_noise and (self._head is None or precondition is not None):
            raise ValueError(
                "project_noise needs the chain to be the final nn.Linear weight (params=None) "
                "and no precondition= (whose moves already stay in the features' span)"
            )
        self._initial_params: dict[str, Tensor] | None = None
        self._saved: list[Tensor] | None = None  # chain parameters saved by setup
        self._num_chains_started = 0
        self.transforms: dict = {}  # MCMC reads it; the state is unconstrained already
        # MCMC stores these (sorted: it unflattens its draws in sorted key order); setup
        # adds the global sites unless the user chose
        self._default_save = sorted(sites)
        self.save_params = sorted(sites)
        self._verified: set = set()  # batch shapes whose chain map was checked
        self._layouts: dict = {}  # batch shape -> head slices of a Sequential encoder
        self._warned = [False]
        self._reset()

    @staticmethod
    def _chain_parameters(encoder, params) -> tuple[nn.Linear | None, list[str]]:
        named = dict(encoder.named_parameters())
        if params is None:
            final = final_linear(encoder)
            if final is None:
                raise ValueError(
                    f"encoder {type(encoder).__name__} has no final nn.Linear layer to use as "
                    "the chain state; end it with an nn.Linear or name the chain parameters "
                    "with params=[...]"
                )
            prefix, head = final
            return head, [f"{prefix}.weight" if prefix else "weight"]
        params = list(params)
        missing = [p for p in params if p not in named]
        if not params or missing:
            raise ValueError(
                f"params {missing or params} are not parameters of the encoder; choose "
                f"from {sorted(named)}"
            )
        return None, params

    # -- state ----------------------------------------------------------------------------
    def _reset(self) -> None:
        self._t = 0
        self._warmup_steps = 0
        self._spec: ap.SiteSpec | None = None
        self._globals: Tensor | None = None  # global sites, flat unconstrained
        self._batch: _Batch | None = None
        self._state: LangevinState | None = None
        self._written = True  # the encoder (and _globals) hold the state's position
        self._adapt: DualAveragingState | None = None
        self._step_size: float | None = self._init_step_size
        self._stats = _fresh_stats()

    @property
    def step_size(self) -> float | None:
        """The step size the next transition uses."""
        return self._step_size

    @property
    def state(self) -> LangevinState | None:
        """The current :class:`~pyro_lvm.infer.mcmc.langevin.LangevinState` (flat
        position: chain coordinates, then the global sites' unconstrained values)."""
        return self._state

    @property
    def matmul_path(self) -> bool | None:
        """Whether proposals on the bound batch cost one matmul of the captured features
        (``True``) or re-run the encoder (``False``); ``None`` without a bound batch."""
        return None if self._batch is None else self._batch.chain.slices is not None

    def _as_dict(self, out: Any) -> dict[str, Tensor]:
        """The encoder output as ``{site: unconstrained value}``."""
        if isinstance(out, Tensor) and len(self.latent_sites) == 1:
            return {self.latent_sites[0]: out}
        if isinstance(out, dict) and set(out) == set(self.latent_sites):
            return out
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise ValueError(
            f"the encoder returned {got} for latent sites {list(self.latent_sites)}; return a "
            "Tensor for one site or a dict mapping each latent site name to its value"
        )

    def _encoder_input(self, args: tuple, kwargs: dict) -> Tensor:
        if self.encoder_input is not None:
            return self.encoder_input(*args, **kwargs)
        if not args:
            raise ValueError(
                "AmortizedLangevin needs the data: call run(x) / step(x), or pass "
                "encoder_input= a function of the model's arguments returning the encoder input"
            )
        return args[0]

    def _inspect(self, args: tuple, kwargs: dict) -> ap.SiteSpec:
        """The model's site spec (traced once per chain); global sites start at a prior
        draw unless the kernel already holds their values."""
        if self._spec is None:
            spec, prior = ap.inspect_model(self.model, self.latent_sites, args, kwargs)
            if self._globals is not None and spec.global_size != self._globals.numel():
                raise ValueError(
                    f"the model's global latent sites {list(spec.global_names)} do not match "
                    "the kernel's saved values; use one kernel per model structure"
                )
            self._spec = spec
            if self.jit_compile:
                self._potential = CompiledFunction(
                    functools.partial(ap.potential, self.model, spec), name="the potential"
                )
            if self._globals is None:
                self._globals = prior
        return self._spec

    def _sync(self) -> None:
        """Write the chain's current state back: chain parameters into the encoder,
        global values into the kernel."""
        if self._state is None or self._batch is None or self._written:
            return
        chain = self._batch.chain
        size = chain.start.numel()
        position = self._state.position
        chain_part = position if size == position.numel() else position[:size]
        with torch.no_grad():
            for p, value in zip(self.chain_params, chain.params_of(chain_part)):
                p.copy_(value)
        if self._spec is not None and self._spec.global_names:
            self._globals = self._state.position[size:].detach()
        self._written = True

    # -- the potential --------------------------------------------------------------------
    def _local_values(self, position: Tensor) -> dict[str, Tensor]:
        return self._batch.chain.local_values(position[: self._batch.chain.start.numel()])

    def latents(self, position: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        r"""Encoder outputs (unconstrained) at ``position`` (default: current): a Tensor
        for one latent site, a dict for several."""
        if self._batch is None:
            raise RuntimeError("call prepare(x) (or setup) before latents()")
        position = self._state.position if position is None else position
        values = self._local_values(position)
        return values if len(self.latent_sites) > 1 else values[self.latent_sites[0]]

    def constrain(self, u: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """Values in each site's support from unconstrained ones (a Tensor for the one
        latent site, or a dict by site name)."""
        if isinstance(u, Tensor):
            return ap.constrain(self._spec, {self.latent_sites[0]: u})[self.latent_sites[0]]
        return ap.constrain(self._spec, u)

    def potential_fn(self, position: Tensor) -> Tensor:
        """:math:`V` of the bound batch at the flat ``position``."""
        return self._batch.potential_fn(position)

    def features(self, x: Tensor) -> Tensor:
        """The input of the encoder's final ``nn.Linear`` on ``x`` (the trunk features
        :math:`G`), from one encoder call."""
        if self._head is None:
            raise ValueError("features() needs the default chain state (params=None)")
        return run_capturing(self.encoder, self._head, x)[1]

    # -- batch set-up -----------------------------------------------------------------------
    def prepare(self, *args, keep_graph: bool = False, **kwargs) -> LangevinState:
        """Bind the data ``args`` and evaluate the state at the encoder's current weights.

        With ``keep_graph`` the trunk features and the state's potential keep their
        autograd graphs to the network parameters (what :class:`~pyro_lvm.infer.lae.LAE`
        backpropagates); otherwise the features are computed once without a graph.
        """
        self._sync()
        x = self._encoder_input(args, kwargs)
        spec = self._inspect(args, kwargs)
        chain = chain_map(
            self.encoder,
            x,
            self.chain_params,
            self.param_names,
            self._head,
            self._as_dict,
            keep_graph=keep_graph,
            precondition=self.precondition,
            verified=self._verified,
            warned=self._warned,
            layouts=self._layouts,
        )
        size = chain.start.numel()
        basis = self._noise_basis(chain)
        local_values = (
            chain.local_values
            if basis is None
            else _on_span(chain.local_values, chain.start, basis)
        )
        potential_fn = ap.potential_fn_gen(
            self.model, spec, local_values, size, args, kwargs, self._potential
        )
        self._batch = _Batch(args, kwargs, chain, potential_fn, basis)
        if ("shapes", tuple(x.shape)) not in self._verified:
            with torch.no_grad():
                ap.check_shapes(spec, chain.local_values(chain.start))
            self._verified.add(("shapes", tuple(x.shape)))
        position = (
            chain.start
            if self._globals is None
            else torch.cat([chain.start, self._globals.to(chain.start)])
        )
        state = langevin_init(
            position, potential_fn, keep_graph=keep_graph, reduce_fn=self.reduce_fn
        )
        # one sum and one sync: finite iff the potential and every gradient entry are
        potential = state.potential.detach()
        if potential.dim():
            potential = potential.sum()
        if not math.isfinite(float(state.grad.sum() + potential)):
            raise DivergenceError(
                f"the potential at the current encoder weights is {float(state.potential)}; "
                "the model or encoder produced NaN/inf: lower the learning rate or re-initialise"
            )
        self._state = state
        self._written = True  # the state was read from the encoder and _globals
        return state

    def _noise_basis(self, chain: ChainMap) -> Tensor | None:
        if not self.project_noise:
            return None
        if chain.slices is None:
            raise ValueError(
                "project_noise needs every latent to be the encoder's final nn.Linear output "
                "or a column slice of it (one call); drop project_noise="
            )
        # data parallel: the union batch's span, identical on every rank (as the noise)
        features = all_gather_cat(chain.features.detach())
        if features.shape[0] >= features.shape[1]:  # the rows span the whole feature space
            return None
        return row_space_basis(features)

    def _noise(self, position: Tensor) -> Tensor:
        """The proposal's standard normal draw, projected (see ``project_noise``)."""
        noise = standard_normal(position, self.generator)
        basis = self._batch.noise_basis
        if basis is None:
            return noise
        size = self._batch.chain.start.numel()
        weight = noise[:size].view(-1, basis.shape[0])
        return torch.cat([((weight @ basis) @ basis.T).reshape(-1), noise[size:]])

    def _find_step_size(self) -> float:
        """The initial step size: a search from the current state with one fixed noise
        draw (:func:`~pyro_lvm.infer.mcmc.adaptation.find_step_size`); the chain does not
        move."""
        state = LangevinState(
            self._state.position, self._state.potential.detach(), self._state.grad
        )
        noise = self._noise(state.position)

        def log_accept(eta: float) -> float:
            position = langevin_proposal(state, eta, noise)
            potential, grad = potential_and_grad(
                self.potential_fn, position, reduce_fn=self.reduce_fn
            )
            return float(
                mala_log_accept_ratio(state, LangevinState(position, potential, grad), eta)
            )

        return find_step_size(log_accept, self.target_accept_prob)

    def _start_adaptation(self) -> None:
        if self._step_size is None:
            self._step_size = self._find_step_size()
        if self.adapt_step_size:
            self._adapt = dual_averaging_init(self._step_size)

    # -- transitions ----------------------------------------------------------------------
    def transition(self, *, adapt: bool | None = None, keep_graph: bool = False) -> LangevinInfo:
        """One MALA/ULA transition of the chain on the bound batch.

        Parameters
        ----------
        adapt : bool, optional
            Update the step size by dual averaging after this transition. Default: during
            the warmup of an :class:`pyro.infer.MCMC` run only.
        keep_graph : bool
            Keep the new state's potential graph (see :meth:`prepare`).
        """
        if self._state is None:
            raise RuntimeError("call prepare(x) (or setup) before transition()")
        if self._step_size is None or (self.adapt_step_size and self._adapt is None):
            self._start_adaptation()
        if adapt is None:
            adapt = self.adapt_step_size and self._t < self._warmup_steps
        self._state, info = langevin_step(
            self._state,
            self._batch.potential_fn,
            self._step_size,
            mh=self.mh,
            noise=None if self._batch.noise_basis is None else self._noise(self._state.position),
            keep_graph=keep_graph,
            generator=self.generator,
            reduce_fn=self.reduce_fn,
        )
        self._written = False
        self._sync()  # the encoder holds the chain's current state (LAE reads it)
        self._t += 1
        if adapt and self._adapt is not None:
            # the end of an MCMC warmup freezes the averaged step size
            final = self._t == self._warmup_steps
            self._adapt, step_size = dual_averaging_step(
                self._adapt,
                info.accept_prob,
                self.target_accept_prob,
                max_t=self.adapt_window,
                final=final,
            )
            self._step_size = float(step_size)
        self._record(info)
        return info

    def _record(self, info: LangevinInfo) -> None:
        stats = self._stats
        if info.log_accept_ratio == -math.inf:  # a non-finite proposal: a divergence
            stats["divergences"].append(stats["n"])
        stats["accept_prob"] += float(info.accept_prob)
        stats["accepted"] += float(info.accepted)
        stats["n"] += 1

    def release(self) -> None:
        """Drop the bound data and every autograd graph (keep the chain and adaptation)."""
        self._sync()
        if self._batch is not None and self.precondition is not None:
            self._state = None  # coordinates relative to this batch's features
        self._batch = None
        if self._state is not None:
            self._state = LangevinState(*(t.detach() for t in self._state))

    @torch.no_grad()
    def potential(self, *args, **kwargs) -> Tensor:
        """:math:`V` at the encoder's current weights on the batch ``args`` (no graph)."""
        self._sync()
        x = self._encoder_input(args, kwargs)
        spec = self._inspect(args, kwargs)
        u = {**self._as_dict(self.encoder(x)), **ap.global_values(spec, self._globals)}
        if self._potential is not None:
            return self._potential(u, args, kwargs)
        return ap.potential(self.model, spec, u, args, kwargs)

    # -- MCMCKernel interface -------------------------------------------------------------
    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        """Start a chain (called by :class:`pyro.infer.MCMC` once per chain).

        The encoder's chain parameters are saved here and restored by :meth:`cleanup`, so
        ``MCMC.run`` leaves the user's modules as they were. The first chain starts at
        the encoder's weights (or ``initial_params``); every later chain of the same kernel
        (``num_chains > 1``, drawn sequentially) starts from latents drawn from the
        model's prior, so that the chains are independent and dispersed. Global sites
        start at a prior draw (or ``initial_params``).
        """
        self._reset()
        self._warmup_steps = warmup_steps
        if self._saved is None:
            self._saved = [p.detach().clone() for p in self.chain_params]
        self._num_chains_started += 1
        self._encoder_input(args, kwargs)  # the data are there: else a one-line error
        spec = self._inspect(args, kwargs)
        if self.save_params == self._default_save:
            self._default_save = sorted([*self.latent_sites, *spec.global_names])
            self.save_params = list(self._default_save)
        init = dict(self._initial_params or {})
        sites = [*self.latent_sites, *spec.global_names]
        unknown = set(init) - {*sites, *self.param_names}
        if unknown:
            raise ValueError(
                f"initial_params has keys {sorted(unknown)} that are neither latent sites "
                f"{sites} nor chain parameters {self.param_names}; key them by site or "
                "parameter name"
            )
        if set(init) & set(self.param_names):
            with torch.no_grad():
                for name, p in zip(self.param_names, self.chain_params):
                    if name in init:
                        p.copy_(init[name])
        local = {n: init[n] for n in self.latent_sites if n in init}
        if not local and self._num_chains_started > 1 and self._head is not None:
            local = self._prior_latents(*args, **kwargs)
        if local:
            self._solve_weights(ap.unconstrain(spec, local), args, kwargs)
        if any(n in init for n in spec.global_names):
            current = ap.constrain(spec, ap.global_values(spec, self._globals))
            values = ap.unconstrain(spec, {n: init.get(n, current[n]) for n in spec.global_names})
            self._globals = torch.cat([values[n].reshape(-1) for n in spec.global_names])
        self.prepare(*args, **kwargs)
        self._start_adaptation()

    def _prior_latents(self, *args, **kwargs) -> dict[str, Tensor]:
        """A draw of the local latent sites from the model's prior (a dispersed start)."""
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        return {n: trace.nodes[n]["value"] for n in self.latent_sites}

    def _solve_weights(self, u: dict[str, Tensor], args: tuple, kwargs: dict) -> None:
        """Set the final layer's weight so that the encoder outputs ``u`` (unconstrained),
        or refuse in one line."""
        x = self._encoder_input(args, kwargs)
        slices = None
        if self._head is not None:
            with torch.no_grad():
                out, features, y, calls = run_capturing(self.encoder, self._head, x)
            slices = head_slices(self._as_dict(out), y) if calls == 1 else None
        if slices is None:
            names = list(u)
            raise ValueError(
                f"initial_params keyed by {names[0] if len(names) == 1 else names!r} needs "
                "the default chain state whose sites are columns of the final nn.Linear's "
                f"output; key them by parameter names {self.param_names} instead"
            )
        missing = [n for n in self.latent_sites if n not in u]
        if missing:
            raise ValueError(f"initial_params lacks latent sites {missing}; give every local site")
        with torch.no_grad():
            self._head.weight.copy_(solve_head_weight(features, self._head, slices, u))

    def _current_sample(self) -> dict[str, Tensor]:
        """Every latent site's value (constrained) at the current state."""
        position = self._state.position
        with torch.no_grad():
            u = self._local_values(position)
            if self._spec.global_names:
                size = self._batch.chain.start.numel()
                u = {**u, **ap.global_values(self._spec, position[size:])}
            return {n: v.detach().clone() for n, v in ap.constrain(self._spec, u).items()}

    @property
    def initial_params(self) -> dict[str, Tensor]:
        return self._current_sample()

    @initial_params.setter
    def initial_params(self, params: dict[str, Tensor]) -> None:
        keys = set(params)
        if not set(self.latent_sites) <= keys and not keys <= set(self.param_names):
            sites = self.latent_sites
            named = f"site {sites[0]!r}" if len(sites) == 1 else f"sites {list(sites)}"
            raise ValueError(
                f"initial_params must be keyed by the latent {named} (plus any global "
                f"sites) or by chain parameter names {self.param_names}, got {sorted(keys)}"
            )
        self._initial_params = dict(params)

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._t == self._warmup_steps:
            self._stats = _fresh_stats()  # the sampling phase only
        self.transition()
        return self._current_sample()

    def cleanup(self) -> None:
        # MCMC calls this twice: idempotent; keeps the diagnostics and restores the
        # encoder's weights saved by setup (the user's modules are left as they were)
        self.release()
        if self._saved is not None:
            with torch.no_grad():
                for p, value in zip(self.chain_params, self._saved):
                    p.copy_(value)
            self._saved = None

    def accept_rate(self) -> float:
        """Fraction of accepted proposals (since warmup ended, under MCMC)."""
        n = self._stats["n"]
        return self._stats["accepted"] / n if n else float("nan")

    def diagnostics(self) -> dict[str, Any]:
        """This chain's acceptance, step size and divergences (the indices of the
        transitions since warmup whose proposal was non-finite, as Pyro's HMC lists
        them; :class:`pyro.infer.MCMC` collects them per chain)."""
        n = self._stats["n"]
        return {
            "accept_rate": self.accept_rate(),
            "accept_prob": self._stats["accept_prob"] / n if n else float("nan"),
            "step_size": self._step_size if self._step_size is not None else float("nan"),
            "divergences": list(self._stats["divergences"]),
            "num_divergences": len(self._stats["divergences"]),
        }

    def logging(self) -> dict[str, str]:
        n = self._stats["n"]
        return {
            "step size": f"{self._step_size:.2e}" if self._step_size else "-",
            "acc. prob": f"{self._stats['accept_prob'] / n:.3f}" if n else "-",
        }

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Adaptation state and global sites (the chain itself lives in the encoder)."""
        self._sync()
        return {
            "t": self._t,
            "step_size": self._step_size,
            "adapt": None if self._adapt is None else self._adapt._asdict(),
            "globals": self._globals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._t = int(state["t"])
        step = state["step_size"]
        self._step_size = None if step is None else float(step)
        adapt = state["adapt"]
        if adapt is not None:  # older checkpoints hold 0-d tensors: Python floats now
            adapt = {k: v if k == "t" else float(v) for k, v in adapt.items()}
            adapt = DualAveragingState(**adapt)
        self._adapt = adapt
        self._globals = state.get("globals")
