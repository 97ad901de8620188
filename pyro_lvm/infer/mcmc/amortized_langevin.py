r"""Amortized Langevin dynamics as a Pyro MCMC kernel: a thin shell over
:mod:`~pyro_lvm.infer.mcmc.ald`.

The kernel validates its options once, owns the chain's persistent state (an
:class:`~pyro_lvm.infer.mcmc.ald.ALDState`: step size, adaptation, global sites) and the
caches of its chain (:class:`~pyro_lvm.infer.mcmc.chain.ChainCache`), and implements
Pyro's ``setup / sample / cleanup / diagnostics / logging``. A transition is one call of
:func:`~pyro_lvm.infer.mcmc.ald.ald_transition`. :class:`~pyro_lvm.infer.LAE` drives the
same functions through :meth:`AmortizedLangevin.bind`. The math, the options' effects
and measurements are in ``docs/langevin.md``.

References
----------
Taniguchi, Iwasawa, Kumagai, Matsuo (2022), "Langevin Autoencoders for Learning Deep
Latent Variable Models", NeurIPS.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor, nn

from pyro_lvm.infer import sites as S
from pyro_lvm.infer.compile import CompiledFunction, compile_backend
from pyro_lvm.infer.mcmc import ald
from pyro_lvm.infer.mcmc import mixing as M
from pyro_lvm.infer.mcmc.adaptation import DualAveragingState
from pyro_lvm.infer.mcmc.chain import (
    ChainCache,
    ChainSpec,
    RankConditionWarning,
    encoder_values,
    find_chain,
)
from pyro_lvm.infer.mcmc.checks import check_flat, check_potential, flat_coordinates
from pyro_lvm.infer.mcmc.initial import apply_initial_params, check_initial_keys
from pyro_lvm.infer.mcmc.langevin import LangevinState

__all__ = ["AmortizedLangevin", "RankConditionWarning"]

#: the default damping of feature preconditioning, relative to the mean diagonal of
#: G G^T: trained features put most of that trace into one shared direction, so a
#: larger damping (1e-3) swamps half of the per-datapoint directions at 100 rows
DEFAULT_PRECONDITION = 1e-6


def _potential(model: Callable, sites: S.ModelSites, u: dict, args: tuple, kwargs: dict):
    return -S.log_joint(model, sites, u, args, kwargs)


class AmortizedLangevin(MCMCKernel):
    r"""MALA on an encoder's head weights; its outputs along the chain are posterior samples.

    Parameters
    ----------
    model : callable
        Pyro model ``model(x, ...)`` whose local latent sites ``latent_site`` lie inside a
        full-size data plate over the rows of ``x``. Every other latent site outside that
        plate is *global*: it joins the chain (its unconstrained value) and
        ``get_samples()`` returns it too. Constrained supports are sampled in Pyro's
        unconstrained space, with the log-abs-det-Jacobian in the potential.
    encoder : nn.Module
        ``encoder(x)`` returns the local sites' unconstrained values: a Tensor (one site),
        a dict ``{site: value}``, or a ``(loc, scale)`` pair (per site or for the one
        site) as amortized Pyro guides do, whose ``loc`` is the value.
    latent_site : str or sequence of str
        The local latent sample sites.
    step_size : float, optional
        Initial MALA step size :math:`\eta` (default: a search from :math:`10^{-3}`).
    mh : bool
        Metropolis-Hastings correction (MALA); ``False`` gives unadjusted Langevin.
    adapt_step_size : bool
        Dual averaging of :math:`\log\eta` towards ``target_accept_prob``: during warmup
        under :class:`pyro.infer.MCMC`, throughout training under LAE.
    target_accept_prob : float
        Target acceptance probability (0.574 is optimal for MALA in high dimension).
    params : sequence of str, optional
        Names (``encoder.named_parameters()``) of the chain parameters. By default the
        heads are found: the ``nn.Linear`` layers whose outputs (or column slices of
        them) are the sites' values, e.g. ``fc21`` in ``z_loc = self.fc21(hidden)``.
        Other encoders are re-run at every proposal after a check that their output is
        affine in the chain parameters.
    precondition : float or None
        Damping :math:`\lambda` of feature preconditioning (default ``1e-6``): per batch a
        fixed linear reparametrization of the chain that makes it per-datapoint Langevin
        in latent space, so the chain mixes whatever the conditioning of the features;
        exact. ``None``: plain ALD on the weights.
    project_noise : bool
        Without preconditioning, draw the proposal noise of each head's weight in the
        row space of its features only (the latents' law is unchanged; the free random
        walk of the weight in directions no datapoint of the batch sees stops).
    encoder_input : callable, optional
        ``encoder_input(*model_args, **model_kwargs)`` -> the encoder's input (default:
        the model's first positional argument).
    adapt_window : int, optional
        Cap on the dual-averaging counter: a fixed-gain tracker for targets that keep
        changing (training); ``None`` is textbook dual averaging.
    generator : torch.Generator, optional
        Source of the proposal noise and the MH uniform (default: the global RNG).
    reduce_fn : callable, optional
        ``reduce_fn(potential, grad) -> (potential, grad)``: local to global values
        (data parallel; see :mod:`pyro_lvm.infer.mcmc`).
    jit_compile : bool or str
        Compile the potential once per batch signature, as Pyro's ``HMC(jit_compile=True)``
        (:class:`~pyro_lvm.infer.compile.CompiledFunction`: captured with ``torch.fx``,
        compiled by Inductor, guarded; a string names the backend, ``"inductor"`` or
        ``"fx"``). A model the compiled path cannot replay exactly (a branch on a tensor's
        value, a Python value that keeps changing) runs eagerly, with one
        :class:`~pyro_lvm.infer.compile.CompileWarning` saying why.

    Examples
    --------
    >>> kernel = AmortizedLangevin(vae.model, vae.encoder, latent_site="latent")  # doctest: +SKIP
    >>> mcmc = pyro.infer.MCMC(kernel, num_samples=500, warmup_steps=200)  # doctest: +SKIP
    >>> mcmc.run(x)  # doctest: +SKIP
    >>> z = mcmc.get_samples()["latent"]  # (500, n, latent_dim)  # doctest: +SKIP
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
        precondition: float | None = DEFAULT_PRECONDITION,
        project_noise: bool = False,
        encoder_input: Callable[..., Tensor] | None = None,
        adapt_window: int | None = None,
        generator: torch.Generator | None = None,
        reduce_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        jit_compile: bool | str = False,
    ):
        sites = ald.check_options(
            latent_site, encoder, params, step_size, target_accept_prob, precondition, adapt_window
        )
        self.model, self.encoder = model, encoder
        self.latent_site, self.latent_sites = latent_site, sites
        self.mh, self.adapt_step_size = bool(mh), bool(adapt_step_size)
        self.target_accept_prob, self.adapt_window = target_accept_prob, adapt_window
        self.precondition, self.project_noise = precondition, bool(project_noise)
        self.encoder_input, self.params = encoder_input, None if params is None else list(params)
        self.generator, self.reduce_fn = generator, reduce_fn
        self._backend = compile_backend(jit_compile)
        self.jit_compile = self._backend is not None
        self.cache = ChainCache()
        self.sites: S.ModelSites | None = None
        self._potential_of: Callable | None = None
        self._init_step_size = None if step_size is None else float(step_size)
        #: the chain's persistent state (the chain itself lives in the encoder's weights)
        self.state = ald.ALDState(step_size=self._init_step_size)
        self._initial_params: dict[str, Tensor] | None = None
        self._saved: list[Tensor] | None = None  # chain parameters saved by setup
        self._num_chains_started = 0
        self.transforms: dict = {}  # MCMC reads it; the state is unconstrained already
        # MCMC stores these (sorted: it unflattens draws in sorted key order); setup adds
        # the global sites unless the user chose
        self._default_save = sorted(sites)
        self.save_params = sorted(sites)
        self._reset_run()

    # -- the chain and the model (shared with LAE) ------------------------------------------
    def input_of(self, args: tuple, kwargs: dict) -> Tensor:
        """The encoder's input for the model arguments."""
        if self.encoder_input is not None:
            return self.encoder_input(*args, **kwargs)
        if not args:
            raise ValueError(
                "AmortizedLangevin needs the data: call run(x) / step(x), or pass "
                "encoder_input= a function of the model's arguments returning the encoder input"
            )
        return args[0]

    def chain_spec(self, x: Tensor) -> ChainSpec:
        """The chain parameters (found on the first batch, then kept)."""
        if self.cache.spec is None:
            with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
                buffers = {k: b.clone() for k, b in self.encoder.named_buffers()}
                try:  # finding the heads is a look, not a call: no running statistics
                    self.cache.spec = find_chain(self.encoder, x, self.latent_sites, self.params)
                finally:
                    with torch.no_grad():
                        for k, b in self.encoder.named_buffers():
                            b.copy_(buffers[k])
        return self.cache.spec

    @property
    def chain_params(self) -> list[nn.Parameter]:
        """The encoder parameters that form the chain (known after the first batch)."""
        if self.cache.spec is None:
            raise RuntimeError("the chain parameters are found on the first batch; run it first")
        return list(self.cache.spec.params)

    def inspect(self, args: tuple, kwargs: dict) -> S.ModelSites:
        """The model's latent sites (traced once); global sites start at a prior draw
        unless the state holds their values."""
        if self.sites is None:
            sites, prior = S.inspect_model(self.model, args, kwargs, local_sites=self.latent_sites)
            held = self.state.globals
            if held is not None and sites.global_size != held.numel():
                raise ValueError(
                    f"the model's global latent sites {list(sites.global_names)} do not match "
                    "the kernel's saved values; use one kernel per model structure"
                )
            self.sites = sites
            potential = functools.partial(_potential, self.model, sites)
            self._potential_of = (
                CompiledFunction(
                    potential,
                    name="the potential",
                    state={"model": self.model, "sites": sites},
                    backend=self._backend,
                )
                if self._backend is not None
                else potential
            )
            if held is None:
                self.state = self.state._replace(globals=prior)
        return self.sites

    def bind(self, *args, keep_graph: bool = False, **kwargs) -> ald.ALDBatch:
        """The batch ``args`` bound at the encoder's current weights
        (:func:`~pyro_lvm.infer.mcmc.ald.bind_batch`)."""
        x = self.input_of(args, kwargs)
        sites = self.inspect(args, kwargs)
        return ald.bind_batch(
            self.model,
            self.encoder,
            self.chain_spec(x),
            sites,
            self.cache,
            x,
            args,
            kwargs,
            potential_of=self._potential_of,
            keep_graph=keep_graph,
            precondition=self.precondition,
            project_noise=self.project_noise,
        )

    def check(self, batch: ald.ALDBatch, langevin: LangevinState, x: Tensor) -> None:
        """The potential is a function of the state (refused otherwise) and reaches every
        latent coordinate (warned otherwise); once per batch shape."""
        key = ("potential", tuple(x.shape))
        if key in self.cache.verified:
            return
        check_potential(batch, langevin, (self.encoder, getattr(self.model, "__self__", None)))
        check_flat(batch, langevin)
        self.cache.verified.add(key)

    def start(self, batch: ald.ALDBatch, langevin: LangevinState) -> None:
        """Find the step size if none is set; start dual averaging if asked and idle."""
        state = self.state
        if state.step_size is None:
            eta = ald.initial_step_size(
                langevin,
                batch,
                self.target_accept_prob,
                generator=self.generator,
                reduce_fn=self.reduce_fn,
            )
            state = state._replace(step_size=eta)
        if self.adapt_step_size and state.adapt is None:
            state = ald.start_adaptation(state, state.step_size, True)
        self.state = state

    @torch.no_grad()
    def potential(self, *args, **kwargs) -> Tensor:
        """:math:`V` at the encoder's current weights on the batch ``args`` (no graph)."""
        x = self.input_of(args, kwargs)
        sites = self.inspect(args, kwargs)
        u = encoder_values(self.encoder(x), self.latent_sites)
        u = {**u, **S.global_values(sites, self.state.globals)}
        return self._potential_of(u, args, kwargs)

    # -- Pyro's MCMCKernel ------------------------------------------------------------------
    def _reset_run(self) -> None:
        self._batch: ald.ALDBatch | None = None
        self._langevin: LangevinState | None = None
        self._warmup_steps = 0
        self._stats: dict[str, Any] = {"accept_prob": 0.0, "accepted": 0.0, "n": 0}
        self._divergences: list[int] = []
        self._tracked: list[Tensor] = []
        self._free: dict[str, Tensor] = {}
        self._moves: list[tuple[float, float]] = []
        self._first_step_size: float | None = None

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        """Start a chain (called by :class:`pyro.infer.MCMC` once per chain).

        The chain parameters are saved here and restored by :meth:`cleanup`, so
        ``MCMC.run`` leaves the user's modules as they were. The first chain starts at the
        encoder's weights (or ``initial_params``); later chains of the same kernel start
        from latents drawn from the prior (independent, dispersed chains).
        """
        self._reset_run()
        self.sites = None
        self.state = ald.ALDState(step_size=self._init_step_size)
        self._warmup_steps = warmup_steps
        x = self.input_of(args, kwargs)
        params = self.chain_spec(x).params
        if self._saved is None:
            self._saved = [p.detach().clone() for p in params]
        self._num_chains_started += 1
        sites = self.inspect(args, kwargs)
        if self.save_params == self._default_save:
            self._default_save = sorted([*self.latent_sites, *sites.global_names])
            self.save_params = list(self._default_save)
        self.state = apply_initial_params(
            self._initial_params or {},
            self.cache.spec,
            sites,
            self.state,
            self.encoder,
            x,
            prior=self._prior_draw(args, kwargs) if self._num_chains_started > 1 else None,
        )
        batch = self.bind(*args, **kwargs)
        langevin = ald.ald_init(batch, self.state, reduce_fn=self.reduce_fn)
        self.check(batch, langevin, x)
        self.start(batch, langevin)
        self._batch, self._langevin = batch, langevin
        # the mixing summaries leave out flat (masked) coordinates: a free random walk
        # never mixes and says nothing about the rest
        self._free = {n: ~m for n, m in flat_coordinates(batch, langevin).items()}
        self._last = ald.local_latents(langevin, batch)
        self._first_step_size = self.state.step_size

    @property
    def initial_params(self) -> dict[str, Tensor]:
        return ald.local_latents(self._langevin, self._batch)

    @initial_params.setter
    def initial_params(self, params: dict[str, Tensor]) -> None:
        check_initial_keys(params, self.latent_sites, self.encoder)
        self._initial_params = dict(params)

    def _prior_draw(self, args: tuple, kwargs: dict) -> dict[str, Tensor]:
        """The local latent sites drawn from the model's prior (a dispersed start)."""
        trace = S.trace_prior(self.model, args, kwargs)
        return {n: trace.nodes[n]["value"] for n in self.latent_sites}

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """One transition; the latent sites' values at the new state."""
        t, warmup = self.state.t, self._warmup_steps
        before = self._last
        self._langevin, info = ald.ald_transition(
            self._langevin,
            self._batch,
            self.state.step_size,
            mh=self.mh,
            generator=self.generator,
            reduce_fn=self.reduce_fn,
        )
        state = self.state._replace(t=t + 1)
        if self.adapt_step_size and t < warmup:
            final = t + 1 == warmup  # the end of warmup freezes the averaged step size
            state = ald.ald_adapt(state, info.accept_prob, self.target_accept_prob, final=final)
        self.state = state
        sample = ald.local_latents(self._langevin, self._batch)
        if t >= warmup:
            self._record(info, before, sample)
        self._last = sample
        return sample

    def _record(self, info, before: dict, after: dict) -> None:
        stats = self._stats
        if info.log_accept_ratio == -math.inf:  # a non-finite proposal: a divergence
            self._divergences.append(stats["n"])
        stats["accept_prob"] += float(info.accept_prob)
        stats["accepted"] += float(info.accepted)
        stats["n"] += 1
        local = {n: after[n] for n in self.latent_sites}
        free = {n: self._free_of(n, v) for n, v in local.items()}
        flat = torch.cat([v.reshape(-1) for v in local.values()])
        if not self._tracked:
            where = torch.cat([f.reshape(-1) for f in free.values()])
            self._track = M.tracked_coordinates(flat.numel(), where=where)
        self._tracked.append(flat[self._track])
        self._moves.append(M.relative_move({n: before[n] for n in local}, local, free))

    def _free_of(self, name: str, value: Tensor) -> Tensor:
        """The non-flat coordinates of a site's (constrained) draw; all of them where the
        constraint changes the shape (the mask is over the unconstrained value)."""
        mask = self._free.get(name)
        if mask is None or mask.numel() != value.numel():
            return torch.ones_like(value, dtype=torch.bool)
        return mask.reshape(value.shape)

    def cleanup(self) -> None:
        """End the chain: warn if it barely moved; restore the encoder's weights saved by
        :meth:`setup` (``MCMC`` calls this twice: idempotent)."""
        if self._batch is not None:
            for problem in self.mixing_problems():
                warnings.warn(f"AmortizedLangevin: {problem}", M.MixingWarning, stacklevel=2)
        self._batch, self._langevin = None, None
        if self._saved is not None:
            with torch.no_grad():
                for p, value in zip(self.cache.spec.params, self._saved):
                    p.copy_(value)
            self._saved = None

    def mixing_problems(self) -> list[str]:
        """What the sampling phase's mixing summaries show (see :mod:`.mixing`)."""
        draws = len(self._tracked)
        if not draws:
            return []
        ess = M.ess_per_draw(torch.stack(self._tracked)) if draws >= M.MIN_DRAWS else math.nan
        moves = [m / s for m, s in self._moves if s > 0 and m > 0]
        ratio = sorted(moves)[len(moves) // 2] if moves else math.nan
        return M.mixing_problems(num_draws=draws, min_ess_per_draw=ess, move_ratio=ratio)

    def accept_rate(self) -> float:
        """Fraction of accepted proposals since warmup ended."""
        n = self._stats["n"]
        return self._stats["accepted"] / n if n else float("nan")

    def diagnostics(self) -> dict[str, Any]:
        """This chain's acceptance, step size and divergences, under Pyro's keys
        (``"acceptance rate"``, ``"divergences"``: the indices of the transitions since
        warmup whose proposal was non-finite) and ours."""
        n = self._stats["n"]
        rate = self.accept_rate()
        step = self.state.step_size
        return {
            "acceptance rate": rate,
            "divergences": list(self._divergences),
            "accept_rate": rate,
            "accept_prob": self._stats["accept_prob"] / n if n else float("nan"),
            "step_size": step if step is not None else float("nan"),
            "num_divergences": len(self._divergences),
        }

    def logging(self) -> dict[str, str]:
        n = self._stats["n"]
        step = self.state.step_size
        return {
            "step size": f"{step:.2e}" if step else "-",
            "acc. prob": f"{self._stats['accept_prob'] / n:.3f}" if n else "-",
        }

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The persistent state and the chain's parameter names (the chain itself lives
        in the encoder)."""
        state = self.state
        spec = self.cache.spec
        return {
            "t": state.t,
            "step_size": state.step_size,
            "adapt": None if state.adapt is None else state.adapt._asdict(),
            "globals": state.globals,
            "param_names": None if spec is None else list(spec.param_names),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        adapt = state["adapt"]
        if adapt is not None:  # older checkpoints hold 0-d tensors: Python floats now
            adapt = DualAveragingState(
                **{k: v if k == "t" else float(v) for k, v in adapt.items()}
            )
        step = state["step_size"]
        self.state = ald.ALDState(
            step_size=None if step is None else float(step),
            adapt=adapt,
            t=int(state["t"]),
            globals=state.get("globals"),
        )
