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


def _check_subsampling(sites: dict[str, dict]) -> None:
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
        latent_site: str | Sequence[str] = "z",
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
        sites = (latent_site,) if isinstance(latent_site, str) else tuple(latent_site)
        if not sites or not all(isinstance(s, str) for s in sites) or len(set(sites)) < len(sites):
            raise ValueError(
                f"latent_site must be a site name or a sequence of distinct names, got "
                f"{latent_site!r}"
            )
        self.model, self.encoder, self.latent_site = model, encoder, latent_site
        self.latent_sites: tuple[str, ...] = sites
        self.mh, self.adapt_step_size = mh, adapt_step_size
        self.target_accept_prob, self.adapt_window = target_accept_prob, adapt_window
        self._init_step_size = step_size
        self._initial_params: dict[str, Tensor] | None = None
        # chain parameters saved by setup, restored by cleanup; chains started so far
        self._saved: list[Tensor] | None = None
        self._num_chains_started = 0
        self.transforms: dict = {}  # MCMC reads it; the state is unconstrained already
        # MCMC stores these sites; setup adds the global sites unless the user chose
        self._default_save = sorted(sites)
        self.save_params = sorted(sites)

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
        if len(sites) > 1:
            pass  # the encoder returns a dict: always re-evaluated (generic path)
        elif self._head is not None and plain_sequential:
            self._trunk = nn.Sequential(*list(encoder)[:-1])  # shares the modules
        elif isinstance(encoder, nn.Linear):
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
        self._shapes_checked = False
        # per latent site: biject_to(support), None for real supports
        self._transforms: dict[str, Any] = {}
        self._local_shapes: dict[str, tuple] = {}
        # global (non-plated) latent sites: names, unconstrained shapes, current values
        self._global_names: tuple[str, ...] = ()
        self._global_shapes: tuple[torch.Size, ...] = ()
        self._global_u: Tensor | None = None
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

    def _chain_size(self) -> int:
        """Length of the chain-parameter part of the position (its prefix)."""
        if self._reparam is not None:
            phi0, A = self._reparam
            return phi0.shape[0] * A.shape[0]
        return sum(p.numel() for p in self.chain_params)

    def _flat_position(self) -> Tensor:
        """The chain position at the encoder's current weights (and global values)."""
        if self._reparam is not None:
            phi0, A = self._reparam
            chain = torch.zeros(self._chain_size(), dtype=phi0.dtype, device=phi0.device)
        else:
            chain = torch.cat([p.detach().reshape(-1) for p in self.chain_params])
        if self._global_u is None:
            return chain
        return torch.cat([chain, self._global_u.to(chain)])

    def _unflatten(self, position: Tensor) -> list[Tensor]:
        """Chain parameter values at ``position`` (its chain part)."""
        if self._reparam is not None:
            phi0, A = self._reparam
            return [phi0 + position[: self._chain_size()].view(phi0.shape[0], A.shape[0]) @ A]
        out, i = [], 0
        for p in self.chain_params:
            out.append(position[i : i + p.numel()].view_as(p))
            i += p.numel()
        return out

    def _write_back(self, position: Tensor) -> None:
        """The encoder holds the chain's current state; the kernel the global values."""
        with torch.no_grad():
            for p, value in zip(self.chain_params, self._unflatten(position)):
                p.copy_(value)
        if self._global_names:
            self._global_u = position[self._chain_size() :].detach()

    # -- the potential --------------------------------------------------------------------
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

    def _local_values(self, position: Tensor) -> dict[str, Tensor]:
        """Encoder outputs (unconstrained) per latent site at ``position``."""
        if self._trunk is not None:
            (weight,) = self._unflatten(position)
            return {self.latent_sites[0]: F.linear(self._features, weight, self._head.bias)}
        values = dict(zip(self.param_names, self._unflatten(position)))
        out = torch.func.functional_call(self.encoder, values, (self._input,))
        return self._as_dict(out)

    def _global_values(self, position: Tensor | None) -> dict[str, Tensor]:
        """Global sites' unconstrained values from the tail of ``position``."""
        if not self._global_names:
            return {}
        tail = position[self._chain_size() :] if position is not None else self._global_u
        out, i = {}, 0
        for name, shape in zip(self._global_names, self._global_shapes):
            n = math.prod(shape)
            out[name] = tail[i : i + n].view(shape)
            i += n
        return out

    def latents(self, position: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        r"""Encoder outputs :math:`z = \Phi g(x) + b` at ``position`` (default: current):
        a Tensor for one latent site, a dict for several (unconstrained values)."""
        if position is None:
            position = self._state.position if self._state is not None else None
            position = self._flat_position() if position is None else position
        values = self._local_values(position)
        return values if len(self.latent_sites) > 1 else values[self.latent_sites[0]]

    def _log_joint(self, u: dict[str, Tensor]) -> Tensor:
        r""":math:`\log p(x, z = T(u)) + \sum_s \log|\det \partial T_s / \partial u_s|` for
        the values :math:`u_s` in each site's unconstrained space
        (:math:`T_s` = ``biject_to(site.support)``, the identity for real latents)."""
        if not self._shapes_checked:
            self._check_shapes(u)
        z = self.constrain(u)
        # validation off: the Langevin core itself turns non-finite potentials into
        # rejections, and Pyro's per-site NaN/inf checks cost a sync per site
        # params pass the block: LAE traces them to train the model's Pyro params
        with poutine.block(hide_fn=_not_param), pyro.validation_enabled(False):
            model = poutine.condition(self.model, data=z)
            trace = poutine.trace(model).get_trace(*self._args, **self._kwargs)
            log_joint = trace.log_prob_sum()
        for name, transform in self._transforms.items():
            if transform is not None:
                log_joint = log_joint + transform.log_abs_det_jacobian(u[name], z[name]).sum()
        return log_joint

    def constrain(self, u: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """Latent values in each site's support from unconstrained values (a Tensor for
        the one latent site, or a dict by site name)."""
        if isinstance(u, Tensor):
            transform = self._transforms.get(self.latent_sites[0])
            return u if transform is None else transform(u)
        return {
            n: v if self._transforms.get(n) is None else self._transforms[n](v)
            for n, v in u.items()
        }

    def potential_fn(self, position: Tensor) -> Tensor:
        """:math:`V = -\\log p(x, z = \\text{encoder}(x), \\theta)`, summed over the batch
        (:math:`\\theta` the global sites, the tail of ``position``)."""
        return -self._log_joint({**self._local_values(position), **self._global_values(position)})

    def _check_shapes(self, u: dict[str, Tensor]) -> None:
        for name in self.latent_sites:
            expected, got = self._local_shapes[name], tuple(u[name].shape)
            if got != expected:
                raise ValueError(
                    f"the encoder outputs shape {got} but latent site {name!r} has shape "
                    f"{expected}; make encoder(x) match the latent site"
                )
        self._shapes_checked = True

    def _check_model(self) -> None:
        """One-line errors for a model ALD cannot sample (traced once, from the prior);
        records each site's transform and finds the global sites (drawing their start
        from the prior when the kernel has none)."""
        # sampling from the prior must not consume random numbers: a resumed run has to
        # continue exactly as an uninterrupted one (which did this check long ago)
        with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=[]):
            trace = poutine.trace(self.model).get_trace(*self._args, **self._kwargs)
        sites = {
            name: site
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)
        }
        latent = [n for n, s in sites.items() if not s["is_observed"]]
        for name in self.latent_sites:
            if name not in sites:
                raise ValueError(
                    f"the model has no sample site {name!r}; pass latent_site= one of its "
                    f"latent sites {latent}"
                )
        _check_subsampling(sites)
        data_plates = {f.name for n in self.latent_sites for f in sites[n]["cond_indep_stack"]}
        transforms, global_names, global_shapes, global_values = {}, [], [], []
        for name in latent:
            site = sites[name]
            fn = site["fn"]
            if fn.support.is_discrete:
                raise ValueError(
                    f"latent site {name!r} is discrete ({type(fn).__name__}); Langevin "
                    "dynamics needs continuous latents: use an SVI estimator (e.g. "
                    "TraceNVIL_ELBO) or condition it out with poutine.condition"
                )
            transform = biject_to(fn.support)
            support = fn.support
            while isinstance(support, constraints.independent):
                support = support.base_constraint
            transforms[name] = None if support is constraints.real else transform
            if name in self.latent_sites:
                shape = tuple(fn.batch_shape + fn.event_shape)
                self._local_shapes[name] = tuple(transform.inv.forward_shape(shape))
                continue
            plates = [f.name for f in site["cond_indep_stack"] if f.name in data_plates]
            if plates:
                raise ValueError(
                    f"latent site {name!r} is inside the data plate {plates[0]!r} but not in "
                    f"latent_site={list(self.latent_sites)}; add it to latent_site (the "
                    "encoder outputs it) or condition it out with poutine.condition"
                )
            u = transform.inv(site["value"])
            global_names.append(name)
            global_shapes.append(u.shape)
            global_values.append(u.reshape(-1))
        self._transforms = transforms
        names = tuple(global_names)
        if self._global_u is not None and names != self._global_names:
            raise ValueError(
                f"the model's global latent sites changed from {list(self._global_names)} to "
                f"{list(names)}; use one kernel per model structure"
            )
        self._global_names, self._global_shapes = names, tuple(global_shapes)
        if names and self._global_u is None:
            self._global_u = torch.cat(global_values)
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
        if not self._checked:
            self._check_model()
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
            self._check_affine(position[: self._chain_size()])
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
        f0, fp, fm = (self._local_values(p) for p in (position, position + d, position - d))
        tol = 1e-3 if position.dtype == torch.float32 else 1e-8
        for name in self.latent_sites:
            second = (fp[name] - 2 * f0[name] + fm[name]).abs().max()
            moved = (fp[name] - fm[name]).abs().max()
            size = moved + f0[name].abs().max() + 1e-12
            if not torch.isfinite(second) or second > tol * size:
                raise ValueError(
                    f"the encoder output {name!r} is not affine in the chain parameters "
                    f"{self.param_names} (relative second difference "
                    f"{float(second / size):.2g}); ALD samples the wrong law then: end the "
                    "encoder with the chain's nn.Linear and move output transforms (exp, "
                    "softplus) into the model, or name affine params="
                )
            if not moved > 0:
                raise ValueError(
                    f"latent site {name!r} does not depend on the chain parameters "
                    f"{self.param_names}, so ALD never moves it: name the weight of the "
                    "layer that outputs it in params= too (or output every site from one "
                    "final nn.Linear)"
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
            x = self._encoder_input(args, kwargs)
            if not self._checked:
                self._check_model()
            u = {**self._as_dict(self.encoder(x)), **self._global_values(None)}
            return -self._log_joint(u)
        finally:
            self._args, self._kwargs, self._features = saved

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
        self._args, self._kwargs = args, kwargs
        self._encoder_input(args, kwargs)  # the data are there: else a one-line error
        self._check_model()  # supports, global sites (their start: a prior draw)
        if self.save_params == self._default_save:
            # sorted: MCMC unflattens its stored draws in sorted key order
            self._default_save = sorted([*self.latent_sites, *self._global_names])
            self.save_params = list(self._default_save)
        init = dict(self._initial_params or {})
        unknown = set(init) - {*self.latent_sites, *self._global_names, *self.param_names}
        if unknown:
            raise ValueError(
                f"initial_params has keys {sorted(unknown)} that are neither latent sites "
                f"{[*self.latent_sites, *self._global_names]} nor chain parameters "
                f"{self.param_names}; key them by site or parameter name"
            )
        latents = None
        if set(init) & set(self.param_names):
            named = dict(self.encoder.named_parameters())
            initial = [init.get(n, named[n]) for n in self.param_names]
            with torch.no_grad():
                for p, value in zip(self.chain_params, initial):
                    p.copy_(value)
        elif self.latent_sites[0] in init:
            latents = init[self.latent_sites[0]]
        elif self._num_chains_started > 1 and self._trunk is not None:
            latents = self._prior_latents(*args, **kwargs)
        if latents is not None:
            latents = self.unconstrain({self.latent_sites[0]: torch.as_tensor(latents)})
            self._solve_weights(latents[self.latent_sites[0]], args, kwargs)
        if any(n in init for n in self._global_names):
            values = {n: init.get(n) for n in self._global_names}
            current = self.constrain(self._global_values(None))
            u = self.unconstrain(
                {n: values[n] if values[n] is not None else current[n] for n in values}
            )
            self._global_u = torch.cat([u[n].reshape(-1) for n in self._global_names])
        self.prepare(*args, **kwargs)
        self._start_adaptation()

    def unconstrain(self, z: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unconstrained values from values in each site's support."""
        out = {}
        for name, value in z.items():
            transform = self._transforms.get(name)
            out[name] = value if transform is None else transform.inv(torch.as_tensor(value))
        return out

    def _prior_latents(self, *args, **kwargs) -> Tensor:
        """A draw of the (single) latent site from the model's prior (a dispersed start)."""
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        return trace.nodes[self.latent_sites[0]]["value"]

    def _solve_weights(self, latents: Tensor, args: tuple, kwargs: dict) -> None:
        r"""Set the final layer's weight :math:`\Phi` so that :math:`G \Phi^\top + b` equals
        ``latents`` (minimum-norm least squares); refuse if the features cannot."""
        site = self.latent_sites[0]
        if self._trunk is None:
            raise ValueError(
                f"initial_params keyed by {site!r} needs the default chain state "
                "(the final nn.Linear of an nn.Sequential encoder, one latent site); key "
                f"them by parameter names {self.param_names} instead"
            )
        with torch.no_grad():
            features = self._trunk(self._encoder_input(args, kwargs))
            bias = self._head.bias if self._head.bias is not None else 0.0
            target = latents.to(features) - bias
            expected = (features.shape[0], self._head.out_features)
            if target.shape != expected:
                raise ValueError(
                    f"initial latents for {site!r} have shape "
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

    def _current_sample(self) -> dict[str, Tensor]:
        """Every latent site's value (constrained) at the current state."""
        position = self._state.position if self._state is not None else self._flat_position()
        with torch.no_grad():
            u = {**self._local_values(position), **self._global_values(position)}
            return {n: v.detach().clone() for n, v in self.constrain(u).items()}

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
            self._stats = {"accept_prob": 0.0, "accepted": 0.0, "n": 0}  # sampling phase only
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
            "globals": self._global_u,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._t = int(state["t"])
        self._step_size = state["step_size"]
        adapt = state["adapt"]
        self._adapt = None if adapt is None else DualAveragingState(**adapt)
        self._global_u = state.get("globals")
