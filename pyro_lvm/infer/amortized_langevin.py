r"""Amortized Langevin dynamics (ALD) as a Pyro MCMC kernel.

Plain Langevin dynamics runs one chain per datapoint on its latent :math:`z_i`. ALD runs
**one** chain on the weight :math:`\Phi` of an encoder's final linear layer, so that the
encoder outputs *are* the posterior samples (Taniguchi et al. 2022):

.. math::

    z_i = \Phi\, g(x_i) + b, \qquad
    V(\Phi) = -\sum_{i=1}^n \log p\bigl(x_i, z_i = \Phi g(x_i) + b\bigr),

with the features :math:`g(x_i)` (the encoder trunk) and the bias :math:`b` held fixed.
Each transition is a MALA step on :math:`\Phi` (see :mod:`pyro_lvm.infer.langevin`) with
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

References
----------
Taniguchi, Iwasawa, Kumagai, Matsuo (2022), "Langevin Autoencoders for Learning Deep
Latent Variable Models", NeurIPS.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from pyro_lvm.infer.diagnostics import DivergenceError
from pyro_lvm.infer.langevin import (
    DualAveragingState,
    LangevinInfo,
    LangevinState,
    dual_averaging_init,
    dual_averaging_step_size,
    dual_averaging_update,
    langevin_init,
    langevin_proposal,
    langevin_step,
    mala_log_accept_ratio,
    potential_and_grad,
)

__all__ = ["AmortizedLangevin", "RankConditionWarning"]


class RankConditionWarning(UserWarning):
    """The encoder has fewer features than the batch has rows: ALD samples then collapse."""


def _not_param(msg: dict) -> bool:
    return msg["type"] != "param"


def _final_linear(encoder: nn.Module) -> tuple[str, nn.Linear] | None:
    """The encoder's final ``nn.Linear`` (its last module if a ``Sequential``, else the
    last registered ``nn.Linear`` submodule), with its qualified name."""
    if isinstance(encoder, nn.Linear):
        return "", encoder
    if isinstance(encoder, nn.Sequential) and len(encoder):
        last = encoder[-1]
        return (str(len(encoder) - 1), last) if isinstance(last, nn.Linear) else None
    found = None
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


class AmortizedLangevin(MCMCKernel):
    r"""MALA on an encoder's final-layer weight; its outputs are posterior samples.

    Parameters
    ----------
    model : callable
        Pyro model ``model(x, ...)`` with a continuous latent site ``latent_site`` inside a
        (full-size, not subsampled) data plate over the rows of ``x``; no other latent
        sites.
    encoder : nn.Module
        ``encoder(x)`` returns latent values of the site's shape ``(n, latent_dim)``. It
        receives the first positional argument given to the model.
    latent_site : str
        Name of the latent sample site.
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
        re-evaluated at every proposal.
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
        centred) and per-datapoint directions barely move.
    encoder_input : callable, optional
        ``encoder_input(*model_args, **model_kwargs)`` returns the encoder's input; by
        default the model's first positional argument (use it when the data are a
        keyword argument or need reshaping).
    adapt_window : int, optional
        Cap on the dual-averaging counter (see
        :func:`~pyro_lvm.infer.langevin.dual_averaging_update`): keeps adaptation
        responsive when the target keeps changing (training). ``None`` (default for
        plain MCMC) is textbook dual averaging.

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
        latent_site: str = "z",
        step_size: float | None = None,
        mh: bool = True,
        adapt_step_size: bool = True,
        target_accept_prob: float = 0.574,
        params: Sequence[str] | None = None,
        adapt_window: int | None = None,
        precondition: float | None = None,
        encoder_input: Callable[..., Tensor] | None = None,
    ):
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
        self.model, self.encoder, self.latent_site = model, encoder, latent_site
        self.mh, self.adapt_step_size = mh, adapt_step_size
        self.target_accept_prob, self.adapt_window = target_accept_prob, adapt_window
        self._init_step_size = step_size
        self._initial_params: dict[str, Tensor] | None = None
        # chain parameters saved by setup, restored by cleanup; chains started so far
        self._saved: list[Tensor] | None = None
        self._num_chains_started = 0
        self.transforms: dict = {}  # MCMC reads it; the state is unconstrained already
        self.save_params = [latent_site]

        named = dict(encoder.named_parameters())
        self._head: nn.Linear | None = None
        if params is None:
            final = _final_linear(encoder)
            if final is None:
                raise ValueError(
                    f"encoder {type(encoder).__name__} has no final nn.Linear layer to use as "
                    "the chain state; end it with an nn.Linear or name the chain parameters "
                    "with params=[...]"
                )
            prefix, self._head = final
            params = [f"{prefix}.weight" if prefix else "weight"]
        else:
            params = list(params)
            missing = [p for p in params if p not in named]
            if not params or missing:
                raise ValueError(
                    f"params {missing or params} are not parameters of the encoder; choose "
                    f"from {sorted(named)}"
                )
        self.param_names: list[str] = params
        self.chain_params: list[nn.Parameter] = [named[p] for p in params]
        # fast path: the chain is exactly the final Linear's weight of a Sequential, so the
        # trunk features are computed once per batch and a proposal costs one matmul
        self._trunk: nn.Module | None = None
        plain_sequential = (
            isinstance(encoder, nn.Sequential) and type(encoder).forward is nn.Sequential.forward
        )
        if self._head is not None and plain_sequential:
            self._trunk = nn.Sequential(*list(encoder)[:-1])  # shares the modules
        elif isinstance(encoder, nn.Linear) and self._head is not None:
            self._trunk = nn.Identity()
        if precondition is not None and self._trunk is None:
            raise ValueError(
                "precondition needs the chain to be the final nn.Linear weight of an "
                "nn.Sequential encoder (params=None)"
            )
        self.precondition = precondition
        self.encoder_input = encoder_input
        self._affine_checked: set[tuple] = set()
        self._reparam: tuple[Tensor, Tensor] | None = None
        self._reset()

    # -- state ----------------------------------------------------------------------------
    def _reset(self) -> None:
        self._t = 0
        self._warmup_steps = 0
        self._args: tuple = ()
        self._input: Tensor | None = None
        self._kwargs: dict = {}
        self._features: Tensor | None = None
        self._state: LangevinState | None = None
        self._adapt: DualAveragingState | None = None
        self._step_size: float | None = self._init_step_size
        self._final_step_size: float | None = None
        self._checked = False
        self._transform = None
        self._warned = False
        self._stats = {"accept_prob": 0.0, "accepted": 0.0, "n": 0}

    @property
    def step_size(self) -> float | None:
        """The step size the next transition uses."""
        return self._step_size

    @property
    def state(self) -> LangevinState | None:
        """The current :class:`~pyro_lvm.infer.langevin.LangevinState` (flat position)."""
        return self._state

    def _flat_position(self) -> Tensor:
        """The chain position at the encoder's current weights."""
        if self._reparam is not None:
            phi0, A = self._reparam
            return torch.zeros(phi0.shape[0] * A.shape[0], dtype=phi0.dtype, device=phi0.device)
        return torch.cat([p.detach().reshape(-1) for p in self.chain_params])

    def _unflatten(self, position: Tensor) -> list[Tensor]:
        """Chain parameter values at ``position``."""
        if self._reparam is not None:
            phi0, A = self._reparam
            return [phi0 + position.view(phi0.shape[0], A.shape[0]) @ A]
        out, i = [], 0
        for p in self.chain_params:
            out.append(position[i : i + p.numel()].view_as(p))
            i += p.numel()
        return out

    def _write_back(self, position: Tensor) -> None:
        """The encoder holds the chain's current state."""
        with torch.no_grad():
            for p, value in zip(self.chain_params, self._unflatten(position)):
                p.copy_(value)

    # -- the potential --------------------------------------------------------------------
    def latents(self, position: Tensor | None = None) -> Tensor:
        r"""Encoder outputs :math:`z = \Phi g(x) + b` at ``position`` (default: current)."""
        if position is None:
            position = self._state.position if self._state is not None else None
            position = self._flat_position() if position is None else position
        if self._trunk is not None:
            (weight,) = self._unflatten(position)
            return F.linear(self._features, weight, self._head.bias)
        values = dict(zip(self.param_names, self._unflatten(position)))
        return torch.func.functional_call(self.encoder, values, (self._input,))

    def _log_joint(self, u: Tensor) -> Tensor:
        r""":math:`\log p(x, z = T(u)) + \log|\det \partial T / \partial u|` for the
        encoder output :math:`u` in the site's unconstrained space
        (:math:`T` = ``biject_to(site.support)``, the identity for real latents)."""
        if not self._checked:
            self._check_model(u)
        transform = self._transform
        z = u if transform is None else transform(u)
        # validation off: the Langevin core itself turns non-finite potentials into
        # rejections, and Pyro's per-site NaN/inf checks cost a sync per site
        # params pass the block: LAE traces them to train the model's Pyro params
        with poutine.block(hide_fn=_not_param), pyro.validation_enabled(False):
            model = poutine.condition(self.model, data={self.latent_site: z})
            trace = poutine.trace(model).get_trace(*self._args, **self._kwargs)
            log_joint = trace.log_prob_sum()
        if transform is not None:
            log_joint = log_joint + transform.log_abs_det_jacobian(u, z).sum()
        return log_joint

    def constrain(self, u: Tensor) -> Tensor:
        """Latent values in the site's support from the encoder's unconstrained output."""
        return u if self._transform is None else self._transform(u)

    def potential_fn(self, position: Tensor) -> Tensor:
        """:math:`V = -\\log p(x, z = \\text{encoder}(x))`, summed over the batch."""
        return -self._log_joint(self.latents(position))

    def _check_model(self, z: Tensor | None) -> None:
        """One-line errors for a model ALD cannot sample (traced once, from the prior)."""
        # sampling from the prior must not consume random numbers: a resumed run has to
        # continue exactly as an uninterrupted one (which did this check long ago)
        with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=[]):
            trace = poutine.trace(self.model).get_trace(*self._args, **self._kwargs)
        sites = {
            name: site
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)
        }
        if self.latent_site not in sites:
            latent = [n for n, s in sites.items() if not s["is_observed"]]
            raise ValueError(
                f"the model has no sample site {self.latent_site!r}; pass latent_site= one "
                f"of its latent sites {latent}"
            )
        fn = sites[self.latent_site]["fn"]
        if fn.support.is_discrete:
            raise ValueError(
                f"latent site {self.latent_site!r} is discrete ({type(fn).__name__}); Langevin "
                "dynamics needs continuous latents: use an SVI estimator (e.g. TraceNVIL_ELBO)"
            )
        site_shape = tuple(fn.batch_shape + fn.event_shape)
        transform = biject_to(fn.support)
        support = fn.support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        self._transform = None if support is constraints.real else transform
        site_shape = tuple(transform.inv.forward_shape(site_shape))
        if z is not None and site_shape != tuple(z.shape):
            raise ValueError(
                f"the encoder outputs shape {tuple(z.shape)} but latent site "
                f"{self.latent_site!r} has shape {site_shape}; make encoder(x) match the "
                "latent site"
            )
        others = [n for n, s in sites.items() if not s["is_observed"] and n != self.latent_site]
        if others:
            raise ValueError(
                f"the model has latent sites {others} besides {self.latent_site!r}; "
                "AmortizedLangevin samples one latent site: condition or remove the others"
            )
        for site in sites.values():
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(
                        f"plate {frame.name!r} subsamples {frame.size} of {frame.full_size} "
                        "rows, which scales the potential by N/n (a colder chain); give the "
                        "model the minibatch with a full-size plate (the potential is the "
                        "plain minibatch sum)"
                    )
        self._checked = True

    # -- batch set-up -----------------------------------------------------------------------
    def prepare(self, *args, keep_graph: bool = False, **kwargs) -> LangevinState:
        """Bind the data ``args`` and evaluate the state at the encoder's current weights.

        With ``keep_graph`` the trunk features and the state's potential keep their
        autograd graphs to the network parameters (what :class:`~pyro_lvm.infer.lae.LAE`
        backpropagates); otherwise the features are computed once without a graph.
        """
        self._args, self._kwargs = args, kwargs
        x = self._input = self._encoder_input(args, kwargs)
        if self._trunk is not None:
            with torch.set_grad_enabled(keep_graph):
                self._features = self._trunk(x)
            self._check_rank(self._features.shape[-1], x.shape[0])
            if self.precondition is not None:
                self._reparam = self._feature_preconditioner(self._features.detach())
        elif self._head is not None:
            self._check_rank(self._head.in_features, x.shape[0])
        position = self._flat_position()
        if self._trunk is None and tuple(x.shape) not in self._affine_checked:
            self._check_affine(position)
            self._affine_checked.add(tuple(x.shape))
        state = langevin_init(position, self.potential_fn, keep_graph=keep_graph)
        if not torch.isfinite(state.potential).all() or not torch.isfinite(state.grad).all():
            raise DivergenceError(
                f"the potential at the current encoder weights is {float(state.potential)}; "
                "the model or encoder produced NaN/inf: lower the learning rate or re-initialise"
            )
        self._state = state
        return state

    def _encoder_input(self, args: tuple, kwargs: dict) -> Tensor:
        if self.encoder_input is not None:
            return self.encoder_input(*args, **kwargs)
        if not args:
            raise ValueError(
                "AmortizedLangevin needs the data: call run(x) / step(x), or pass "
                "encoder_input= a function of the model's arguments returning the encoder input"
            )
        return args[0]

    @torch.no_grad()
    def _check_affine(self, position: Tensor) -> None:
        r"""Refuse an encoder whose output is not affine in the chain parameters.

        ALD's correctness argument needs :math:`z = A(x)\,\phi + c(x)`: a transform such
        as ``exp`` after the chain's layer changes the law the chain samples (no
        Jacobian). Checked by a second difference along a random direction :math:`d`,
        :math:`f(\phi + d) - 2 f(\phi) + f(\phi - d) = 0` for affine :math:`f`.
        """
        gen = torch.Generator(device="cpu").manual_seed(0)  # no draw from the global RNG
        d = torch.randn(position.shape, generator=gen).to(position)
        d = d * (position.abs().mean() + 1.0) * 0.5
        f0, fp, fm = (self.latents(p) for p in (position, position + d, position - d))
        second = (fp - 2 * f0 + fm).abs().max()
        size = (fp - fm).abs().max() + f0.abs().max() + 1e-12
        tol = 1e-3 if position.dtype == torch.float32 else 1e-8
        if not torch.isfinite(second) or second > tol * size:
            raise ValueError(
                f"the encoder output is not affine in the chain parameters {self.param_names} "
                f"(relative second difference {float(second / size):.2g}); ALD samples the "
                "wrong law then: end the encoder with the chain's nn.Linear and move output "
                "transforms (exp, softplus) into the model, or name affine params="
            )

    def _feature_preconditioner(self, features: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\Phi_0, A)` with :math:`A = (G G^\top + \lambda \bar e I)^{-1} G`."""
        gram = features @ features.T
        damping = self.precondition * gram.diagonal().mean()
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        A = torch.linalg.solve(gram + damping * eye, features)
        return self._head.weight.detach().clone(), A

    def _check_rank(self, num_features: int, batch_size: int) -> None:
        if num_features < batch_size and not self._warned:
            self._warned = True
            warnings.warn(
                f"the encoder has {num_features} features for a batch of {batch_size}: ALD "
                "samples collapse when the feature width is below the batch size; widen the "
                "encoder's last hidden layer or use smaller batches",
                RankConditionWarning,
                stacklevel=3,
            )

    def _find_step_size(self) -> float:
        """Double or halve :math:`\\eta` from 1e-3 until one proposal's acceptance
        probability crosses the target (Hoffman & Gelman 2014, Algorithm 4)."""
        state = self._state
        state = LangevinState(state.position, state.potential.detach(), state.grad)
        noise = torch.randn_like(state.position)
        log_target = math.log(self.target_accept_prob)

        def log_accept(eta: float) -> float:
            position = langevin_proposal(state, eta, noise)
            potential, grad = potential_and_grad(self.potential_fn, position)
            proposal = LangevinState(position, potential, grad)
            return float(mala_log_accept_ratio(state, proposal, eta))

        features = self._features
        if features is not None:  # never touch the graph a training step will backpropagate
            self._features = features.detach()
        try:
            eta = 1e-3
            direction = 1.0 if log_accept(eta) > log_target else -1.0
            for _ in range(60):
                new_eta = eta * 2.0**direction
                crossed = (log_accept(new_eta) > log_target) != (direction > 0)
                if crossed:
                    return eta if direction > 0 else new_eta
                eta = new_eta
            return eta
        finally:
            self._features = features

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
        state, info = langevin_step(
            self._state, self.potential_fn, self._step_size, mh=self.mh, keep_graph=keep_graph
        )
        self._state = state
        self._write_back(state.position)
        self._t += 1
        if adapt and self._adapt is not None:
            self._adapt = dual_averaging_update(
                self._adapt, info.accept_prob, self.target_accept_prob, max_t=self.adapt_window
            )
            self._step_size = float(dual_averaging_step_size(self._adapt))
            if self._t == self._warmup_steps:  # end of an MCMC warmup: freeze the average
                self._step_size = float(dual_averaging_step_size(self._adapt, final=True))
        self._stats["accept_prob"] += float(info.accept_prob)
        self._stats["accepted"] += float(info.accepted)
        self._stats["n"] += 1
        return info

    def release(self) -> None:
        """Drop the bound data and every autograd graph (keep the chain and adaptation)."""
        self._args, self._kwargs, self._features, self._input = (), {}, None, None
        if self._reparam is not None and self._state is not None:
            # the position U is relative to this batch's features: store the weights
            self._write_back(self._state.position)
            self._state = None
        self._reparam = None
        if self._state is not None:
            self._state = LangevinState(*(t.detach() for t in self._state))

    @torch.no_grad()
    def potential(self, *args, **kwargs) -> Tensor:
        """:math:`V` at the encoder's current weights on the batch ``args`` (no graph)."""
        saved = self._args, self._kwargs, self._features
        try:
            self._args, self._kwargs = args, kwargs
            return -self._log_joint(self.encoder(self._encoder_input(args, kwargs)))
        finally:
            self._args, self._kwargs, self._features = saved

    # -- MCMCKernel interface -------------------------------------------------------------
    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        """Start a chain (called by :class:`pyro.infer.MCMC` once per chain).

        The encoder's chain parameters are saved here and restored by :meth:`cleanup`, so
        ``MCMC.run`` leaves the user's modules as they were. The first chain starts at
        the encoder's weights (or ``initial_params``); every later chain of the same kernel
        (``num_chains > 1``, drawn sequentially) starts from latents drawn from the
        model's prior, so that the chains are independent and dispersed.
        """
        self._reset()
        self._warmup_steps = warmup_steps
        if self._saved is None:
            self._saved = [p.detach().clone() for p in self.chain_params]
        self._num_chains_started += 1
        latents = None
        if self._initial_params is not None:
            if self.latent_site in self._initial_params:
                latents = self._initial_params[self.latent_site]
            else:
                named = dict(self.encoder.named_parameters())
                initial = [self._initial_params.get(n, named[n]) for n in self.param_names]
                self._write_back(torch.cat([p.detach().reshape(-1) for p in initial]))
        elif self._num_chains_started > 1 and self._trunk is not None:
            latents = self._prior_latents(*args, **kwargs)
        if latents is not None:
            self._args, self._kwargs = args, kwargs
            self._check_model(None)  # the site's support: solve for unconstrained values
            latents = torch.as_tensor(latents)
            if self._transform is not None:
                latents = self._transform.inv(latents)
            self._solve_weights(latents, args, kwargs)
        self.prepare(*args, **kwargs)
        self._start_adaptation()

    def _prior_latents(self, *args, **kwargs) -> Tensor:
        """A draw of the latent site from the model's prior (a dispersed start)."""
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        if self.latent_site not in trace.nodes:
            raise ValueError(
                f"the model has no sample site {self.latent_site!r}; pass latent_site= one "
                "of its latent sites"
            )
        return trace.nodes[self.latent_site]["value"]

    def _solve_weights(self, latents: Tensor, args: tuple, kwargs: dict) -> None:
        r"""Set the final layer's weight :math:`\Phi` so that :math:`G \Phi^\top + b` equals
        ``latents`` (minimum-norm least squares); refuse if the features cannot."""
        if self._trunk is None:
            raise ValueError(
                f"initial_params keyed by {self.latent_site!r} needs the default chain state "
                "(the final nn.Linear of an nn.Sequential encoder); key them by parameter "
                f"names {self.param_names} instead"
            )
        with torch.no_grad():
            features = self._trunk(self._encoder_input(args, kwargs))
            bias = self._head.bias if self._head.bias is not None else 0.0
            target = latents.to(features) - bias
            expected = (features.shape[0], self._head.out_features)
            if target.shape != expected:
                raise ValueError(
                    f"initial latents for {self.latent_site!r} have shape "
                    f"{tuple(latents.shape)}; pass shape {expected}"
                )
            weight_t = torch.linalg.pinv(features) @ target
            residual = (features @ weight_t - target).abs().max()
            if residual > 1e-4 * (1.0 + target.abs().max()):
                raise ValueError(
                    f"the encoder's {features.shape[1]} features cannot reproduce the given "
                    f"latents of {features.shape[0]} rows (residual {float(residual):.2g}); "
                    "widen the encoder's last hidden layer or key initial_params by "
                    "parameter names"
                )
            self._head.weight.copy_(weight_t.T)

    @property
    def initial_params(self) -> dict[str, Tensor]:
        with torch.no_grad():
            return {self.latent_site: self.constrain(self.latents()).detach().clone()}

    @initial_params.setter
    def initial_params(self, params: dict[str, Tensor]) -> None:
        keys = set(params)
        if keys != {self.latent_site} and not keys <= set(self.param_names):
            raise ValueError(
                f"initial_params must be keyed by the latent site {self.latent_site!r} or by "
                f"chain parameter names {self.param_names}, got {sorted(keys)}"
            )
        self._initial_params = dict(params)

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._t == self._warmup_steps:
            self._stats = {"accept_prob": 0.0, "accepted": 0.0, "n": 0}  # sampling phase only
        self.transition()
        with torch.no_grad():
            return {self.latent_site: self.constrain(self.latents()).detach().clone()}

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
        n = self._stats["n"]
        return {
            "accept_rate": self.accept_rate(),
            "accept_prob": self._stats["accept_prob"] / n if n else float("nan"),
            "step_size": self._step_size if self._step_size is not None else float("nan"),
        }

    def logging(self) -> dict[str, str]:
        n = self._stats["n"]
        return {
            "step size": f"{self._step_size:.2e}" if self._step_size else "-",
            "acc. prob": f"{self._stats['accept_prob'] / n:.3f}" if n else "-",
        }

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Adaptation state (the chain state itself lives in the encoder's parameters)."""
        return {
            "t": self._t,
            "step_size": self._step_size,
            "adapt": None if self._adapt is None else self._adapt._asdict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._t = int(state["t"])
        self._step_size = state["step_size"]
        adapt = state["adapt"]
        self._adapt = None if adapt is None else DualAveragingState(**adapt)
