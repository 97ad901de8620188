r"""Particle gradient descent (Kuntz, Lim & Johansen 2023): maximum likelihood with a
persistent cloud of Langevin particles per datapoint, no encoder.

Maximum likelihood for a latent variable model is the minimisation of the free energy
:math:`F(\theta, q) = \int q \log q - \int q(z) \log p_\theta(x, z)\,dz` over the
parameters and a distribution :math:`q` of the latents (Neal & Hinton 1998); EM is
coordinate descent on it. Particle gradient descent discretises its gradient flow: with
:math:`K` particles :math:`z_i^{(1..K)}` for every training datapoint :math:`x_i`,

.. math::

    \theta_{k+1} &= \theta_k + \frac{h_\theta}{K} \sum_{j=1}^K \sum_i
        \nabla_\theta \log p_{\theta_k}(x_i, z_{i,k}^{(j)}), \\
    z_{i,k+1}^{(j)} &= z_{i,k}^{(j)} + h\,\nabla_z \log p_{\theta_k}(x_i, z_{i,k}^{(j)})
        + \sqrt{2h}\,\xi_{i,k}^{(j)},

the decoder following the particle average of the complete-data gradient and every
particle taking a Langevin step on its own posterior :math:`p_\theta(z \mid x_i)`. At a
stationary point the particles sample the posterior and
:math:`\mathbb E_{p_\theta(z \mid x)}[\nabla_\theta \log p_\theta(x, z)] =
\nabla_\theta \log p_\theta(x) = 0` (Fisher's identity): the fixed points are the
maximum-likelihood parameters.

Minibatches (the paper's scalable variant): a step on a batch of rows with dataset
indices ``idx`` moves only those rows' particles (stored per training datapoint and
indexed by ``idx``, so they persist between visits: the method is not amortized) and
takes one optimizer step on the batch's particle-averaged negative log joint, computed
at the particles *before* their move (both updates use :math:`\theta_k, z_k`, as in the
equations above and the authors' code). The particle moves are ``num_steps`` MALA
(``mh=True``, exact for the current :math:`\theta`) or ULA steps of the pure core
:func:`~pyro_lvm.infer.mcmc.langevin_step`, in each latent site's unconstrained space
(the log-Jacobian included), with one step size adapted by dual averaging towards
``target_accept_prob``. A row's particles start at draws from the prior on its first
visit.

The reported loss is that particle-averaged negative log joint summed over the batch:
an energy, not a bound (it omits the particles' entropy).

Test data have no particles. :func:`map_langevin_proposal` starts from each test
datapoint's best posterior mode among a few gradient ascents from prior draws
(:class:`MultiStartMAP`; the authors' code encodes test images the same way) and fits a
Gaussian to short MALA chains from there (:class:`~pyro_lvm.infer.LangevinProposalGuide`),
a valid importance proposal for ``iwae_log_likelihood`` (AIS needs none). Chains started
at the prior draws themselves end in different modes, and one Gaussian pooled over them is
a poor proposal (measured in ``docs/benchmarks.md``).

References
----------
Kuntz, Lim, Johansen (2023), "Particle algorithms for maximum likelihood training of
latent variable models", AISTATS.
Neal, Hinton (1998), "A view of the EM algorithm that justifies incremental, sparse, and
other variants", Learning in Graphical Models.
Han, Lu, Zhu, Wu (2017), "Alternating back-propagation for generator network", AAAI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro import poutine
from torch import Tensor

from pyro_lvm.infer.driver import OptimizerDriver
from pyro_lvm.infer.mcmc.adaptation import (
    DualAveragingState,
    check_step_options,
    dual_averaging_init,
    dual_averaging_step,
)
from pyro_lvm.infer.mcmc.langevin import LangevinState, langevin_init, langevin_step
from pyro_lvm.infer.refine import LangevinProposalGuide, refine_latents
from pyro_lvm.infer.sites import (
    LatentsCache,
    ModelSites,
    find_latents,
    log_densities,
    pack,
    sample_prior,
    unconstrain,
)

__all__ = ["PGD", "MultiStartMAP", "PriorDraws", "map_langevin_proposal"]


class PriorDraws:
    """``init(x) -> (num_chains, B, size)``: packed unconstrained prior draws of the
    latents of ``model(x)``, a start for chains on data without particles.

    One model run per chain and no plate of its own, so it also runs where an evaluator
    has opened a particle plate (plate dimensions are allocated globally)."""

    def __init__(self, model: Callable, num_chains: int, max_plate_nesting: int = 1):
        if num_chains < 1:
            raise ValueError(f"num_chains must be >= 1, got {num_chains}")
        self.model, self.num_chains, self.max_plate_nesting = model, num_chains, max_plate_nesting

    def __call__(self, x: Tensor) -> Tensor:
        spec = find_latents(self.model, x, max_plate_nesting=self.max_plate_nesting)
        draws = []
        with torch.no_grad(), poutine.block():
            for _ in range(self.num_chains):
                trace = poutine.trace(self.model).get_trace(x)
                z = {n: trace.nodes[n]["value"] for n in spec.local_names}
                draws.append(pack(spec, unconstrain(spec, z)))
        return torch.cat(draws)


class MultiStartMAP:
    r"""``init(x) -> (B, size)``: per datapoint, the highest of ``num_starts`` local modes
    of :math:`\log p(x_i, u)` (unconstrained latents, log-Jacobian included), each found
    by ``num_iters`` Adam steps from a prior draw.

    The ascents of all starts and datapoints run as one batch (their objectives are
    independent); only the latents move, the model's gradients are left untouched."""

    def __init__(
        self,
        model: Callable,
        num_starts: int = 8,
        num_iters: int = 100,
        lr: float = 0.05,
        max_plate_nesting: int = 1,
    ):
        if num_iters < 0:
            raise ValueError(f"num_iters must be >= 0, got {num_iters}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.draws = PriorDraws(model, num_starts, max_plate_nesting)
        self.model, self.num_iters, self.lr = model, num_iters, lr

    def __call__(self, x: Tensor) -> Tensor:
        spec = find_latents(self.model, x, max_plate_nesting=self.draws.max_plate_nesting)
        u = self.draws(x).clone().requires_grad_(True)  # (starts, B, size)
        optim = torch.optim.Adam([u], lr=self.lr)

        def log_joint(u: Tensor) -> Tensor:
            log_prior, log_lik = log_densities(self.model, spec, u, x)
            return log_prior + log_lik  # (starts, B)

        with torch.enable_grad(), poutine.block():
            for _ in range(self.num_iters):
                (u.grad,) = torch.autograd.grad(-log_joint(u).sum(), u)
                optim.step()
            with torch.no_grad():
                best = log_joint(u).nan_to_num(nan=-float("inf")).argmax(0)
        return u.detach()[best, torch.arange(x.shape[0], device=best.device)]


def map_langevin_proposal(
    model: Callable,
    num_steps: int,
    *,
    num_starts: int = 8,
    num_iters: int = 100,
    lr: float = 0.05,
    **fit_kwargs,
) -> LangevinProposalGuide:
    """A guide for data without particles: a Gaussian fitted to ``num_steps`` MALA steps
    (half warmup) of chains per datapoint started at its :class:`MultiStartMAP` point."""
    mpn = fit_kwargs.get("max_plate_nesting", 1)
    init = MultiStartMAP(model, num_starts, num_iters, lr, max_plate_nesting=mpn)
    return LangevinProposalGuide(model, init, num_steps, **fit_kwargs)


class PGD(OptimizerDriver):
    """Particle gradient descent: ``step(x, idx) -> float`` (see the module docstring).

    Parameters
    ----------
    model : callable
        Pyro model ``model(x)`` with continuous latent site(s) inside its data plate.
    optim : torch.optim.Optimizer or pyro.optim.PyroOptim
        Optimizer over the model's parameters.
    num_particles : int
        Particles :math:`K` per training datapoint.
    num_steps : int
        Langevin moves of a batch's particles per step.
    step_size : float
        Langevin step size :math:`h` (the initial one when adapting).
    mh : bool
        MALA (default) or ULA (the paper's, biased by :math:`O(h)`).
    adapt_step_size : bool
        Dual averaging of one step size towards ``target_accept_prob`` (bounded memory
        ``adapt_window`` steps).
    latent_site : str or sequence of str, optional
        The latent sites (default: every latent site of the model).
    max_plate_nesting : int
        Plates of the model (the data plate at ``dim=-max_plate_nesting``).
    eval_steps : int
        :meth:`evaluate_loss` without indices (held-out rows): MALA steps from prior
        draws before the energy is taken.
    clip_norm : float, optional
        Clip the global gradient norm.
    """

    #: data parallel is refused: each process would move its own shard's particles in
    #: its own copy of the table
    data_parallel_rng = None

    def __init__(
        self,
        model: Callable,
        optim,
        *,
        num_particles: int = 1,
        num_steps: int = 1,
        step_size: float = 0.01,
        mh: bool = True,
        adapt_step_size: bool = True,
        target_accept_prob: float = 0.574,
        adapt_window: int = 100,
        latent_site: str | Sequence[str] | None = None,
        max_plate_nesting: int = 1,
        eval_steps: int = 20,
        clip_norm: float | None = None,
    ):
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        check_step_options(
            num_steps=num_steps, step_size=step_size, target_accept_prob=target_accept_prob
        )
        super().__init__(optim, clip_norm)
        self.model, self.num_particles, self.num_steps = model, num_particles, num_steps
        self.mh, self.adapt_step_size = mh, adapt_step_size
        self.target_accept_prob, self.adapt_window = target_accept_prob, adapt_window
        self.latent_site, self.max_plate_nesting = latent_site, max_plate_nesting
        self.eval_steps = eval_steps
        self.step_size = float(step_size)
        self._adapt: DualAveragingState | None = (
            dual_averaging_init(step_size) if adapt_step_size else None
        )
        #: ``(rows, K, size)`` packed unconstrained particles, per training datapoint
        self.particles: Tensor | None = None
        #: ``(rows,)``: which rows have particles (the others start from the prior)
        self.initialized: Tensor | None = None
        self._spec = LatentsCache(model, latent_site, max_plate_nesting)
        self._last = {"accept_rate": float("nan"), "step_size": self.step_size}

    # -- the particle table ---------------------------------------------------------------

    def _check_index(self, x: Tensor, idx) -> Tensor:
        if idx is None:
            raise ValueError(
                "PGD.step needs the batch's dataset row indices: step(x, idx) (its particles "
                "are stored per training datapoint; the trainer passes them for "
                "Experiment(pass_index=True))"
            )
        idx = torch.as_tensor(idx, device=x.device).long().reshape(-1)
        if idx.numel() != x.shape[0] or bool((idx < 0).any()):
            raise ValueError(
                f"idx must hold one non-negative dataset row index per row of x; got "
                f"{idx.numel()} indices for {x.shape[0]} rows"
            )
        if idx.unique().numel() != idx.numel():
            raise ValueError("idx repeats a row; a batch must visit each datapoint once")
        return idx

    def _grow(self, rows: int, size: int, like: Tensor) -> None:
        """Room for ``rows`` datapoints (doubling, so a growing dataset costs O(log N))."""
        have = 0 if self.particles is None else self.particles.shape[0]
        if rows <= have:
            return
        rows = max(rows, 2 * have)
        particles = like.new_zeros((rows, self.num_particles, size))
        initialized = torch.zeros(rows, dtype=torch.bool, device=like.device)
        if self.particles is not None:
            particles[:have] = self.particles
            initialized[:have] = self.initialized
        self.particles, self.initialized = particles, initialized

    def _gather(self, spec: ModelSites, x: Tensor, idx: Tensor) -> Tensor:
        """The batch's particles ``(K, B, size)``; a row seen first starts at the prior."""
        self._grow(int(idx.max()) + 1, spec.size, x)
        fresh = ~self.initialized[idx]
        if bool(fresh.any()):
            draws = sample_prior(self.model, spec, self.num_particles, x)  # (K, B, size)
            rows = idx[fresh]
            self.particles[rows] = draws[:, fresh].transpose(0, 1).to(self.particles)
            self.initialized[rows] = True
        return self.particles[idx].transpose(0, 1).to(x.dtype)

    # -- the step -------------------------------------------------------------------------
    def step(self, x: Tensor, idx=None) -> float:
        """Move the batch's particles, then one optimizer step; returns the batch's
        particle-averaged negative log joint (before the update)."""
        idx = self._check_index(x, idx)
        return float(self._descend(lambda: self._energy_and_move(x, idx)))

    def _potential(self, spec: ModelSites, x: Tensor) -> Callable[[Tensor], Tensor]:
        def potential(u: Tensor) -> Tensor:
            log_prior, log_lik = log_densities(self.model, spec, u, x)
            return -(log_prior + log_lik)

        return potential

    def _energy_and_move(self, x: Tensor, idx: Tensor) -> Tensor:
        spec = self._spec(x)
        with poutine.block():
            u = self._gather(spec, x, idx)
            potential = self._potential(spec, x)
            # the decoder's gradient at (theta_k, z_k): the potential's graph is kept
            state = langevin_init(u, potential, keep_graph=True)
            energy = state.potential.sum() / self.num_particles
            state = LangevinState(state.position, state.potential.detach(), state.grad)
            eta, accept = self.step_size, []
            for _ in range(self.num_steps):
                state, info = langevin_step(state, potential, eta, mh=self.mh, event_dim=1)
                accept_prob = info.log_accept_ratio.clamp(max=0.0).exp().mean()
                accept.append(float(accept_prob))
                if self._adapt is not None:
                    self._adapt, eta = dual_averaging_step(
                        self._adapt, accept_prob, self.target_accept_prob, max_t=self.adapt_window
                    )
                    eta = float(eta)
        self.particles[idx] = state.position.transpose(0, 1).to(self.particles)
        self.step_size = eta
        self._last = {"accept_rate": sum(accept) / len(accept), "step_size": eta}
        return energy

    @torch.no_grad()
    def evaluate_loss(self, x: Tensor, idx=None) -> float:
        """The particle-averaged negative log joint summed over the batch, without an
        update: at the stored particles of rows ``idx``, or (held-out rows, ``idx=None``)
        at ``eval_steps`` MALA steps from ``num_particles`` prior draws per row."""
        spec = self._spec(x)
        with poutine.block():
            if idx is not None:
                idx = self._check_index(x, idx)
                u = self._gather(spec, x, idx)
            else:
                u = sample_prior(self.model, spec, self.num_particles, x)
                if self.eval_steps > 0:
                    with torch.enable_grad():
                        u, _ = refine_latents(
                            self.model,
                            x,
                            u,
                            self.eval_steps,
                            step_size=self.step_size,
                            target_accept_prob=self.target_accept_prob,
                            latent_site=self.latent_site,
                            max_plate_nesting=self.max_plate_nesting,
                        )
            return float(self._potential(spec, x)(u).sum() / self.num_particles)

    # -- state ----------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {
            "particles": self.particles,
            "initialized": self.initialized,
            "step_size": self.step_size,
            "adapt": None if self._adapt is None else self._adapt._asdict(),
            "last": dict(self._last),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        # copies: the table is updated in place, and a state dict may be another driver's
        particles, initialized = state["particles"], state["initialized"]
        self.particles = None if particles is None else particles.clone()
        self.initialized = None if initialized is None else initialized.clone()
        self.step_size = float(state["step_size"])
        adapt = state.get("adapt")
        self._adapt = None if adapt is None else DualAveragingState(**adapt)
        self._last = dict(state.get("last", self._last))

    def metrics(self) -> dict[str, float]:
        """``accept_rate`` (mean MALA acceptance probability of the last batch's moves)
        and ``step_size``."""
        return dict(self._last)
