r"""SVI with module parameters and a :mod:`torch.optim` or :mod:`pyro.optim` optimizer.

Pyro's :class:`pyro.infer.SVI` reads parameters from the global param store and wraps
one optimizer per tensor. pyro_lvm's models keep their parameters on ``nn.Module``
objects (and also register them with :func:`pyro.module`), so this driver differentiates
``loss.differentiable_loss(model, guide, *args)`` and steps an ordinary optimizer:
checkpoints are ``state_dict``\ s and resume is exact. The Pyro params the model and
guide use (``pyro.param``, ``pyro.module``) are traced and trained as well, and the
optimizer may be a :class:`pyro.optim.PyroOptim` (see
:class:`~pyro_lvm.infer.optim.ParamOptimizer`). With ``Trace_ELBO``, ``ModuleSVI`` and
``pyro.infer.SVI`` take the same steps on the same seed.

A non-finite loss raises :class:`~pyro_lvm.infer.diagnostics.DivergenceError` *before*
the optimizer step, so the parameters never become NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pyro
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.optim import PyroOptim
from torch.distributions import kl_divergence

from pyro_lvm.infer.compile import BACKENDS, CompiledFunction, compile_backend
from pyro_lvm.infer.driver import OptimizerDriver

__all__ = ["ModuleSVI"]

#: Pyro's JIT ELBOs that jit_compile= replaces (their eager base class, compiled here)
_COMPILED_JIT = tuple(
    getattr(pyro.infer, name)
    for name in ("JitTrace_ELBO", "JitTraceMeanField_ELBO")
    if hasattr(pyro.infer, name)
)


#: every JIT ELBO Pyro has (they record the model with TorchScript's tracer)
_JIT_ELBOS = tuple(
    cls
    for name in dir(pyro.infer)
    if name.startswith("Jit") and isinstance(cls := getattr(pyro.infer, name), type)
)


def _is_jit(loss: ELBO) -> bool:
    return isinstance(loss, _JIT_ELBOS)


def _eager_class(loss: ELBO) -> type:
    """The class whose methods run ``loss`` eagerly: a JIT ELBO's base class."""
    return next(c for c in type(loss).__mro__ if not issubclass(c, _JIT_ELBOS))


def _compilable(loss: ELBO) -> bool:
    """ELBOs whose loss :func:`_surrogate_loss` computes (Trace_ELBO,
    TraceMeanField_ELBO and their JIT versions)."""
    return isinstance(loss, Trace_ELBO)


def _trace_elbo(model_trace, guide_trace) -> torch.Tensor:
    """Trace_ELBO's ELBO estimate whose value is the ELBO and whose gradient is its
    surrogate's (Pyro's ``_differentiable_loss_particle``, with tensors in place of its
    ``torch_item`` floats): the model's log-densities less the guide's, plus the
    score-function terms of non-reparameterized guide sites."""
    elbo, surrogate, log_r, score_terms = 0.0, 0.0, None, False
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            elbo = elbo + site["log_prob_sum"]
            surrogate = surrogate + site["log_prob_sum"]
    for site in guide_trace.nodes.values():
        if site["type"] != "sample":
            continue
        _, score_function_term, entropy_term = site["score_parts"]
        elbo = elbo - site["log_prob_sum"]
        if not is_identically_zero(entropy_term):
            surrogate = surrogate - entropy_term.sum()
        if not is_identically_zero(score_function_term):
            if log_r is None:
                log_r = _compute_log_r(model_trace, guide_trace)
            cost = log_r.sum_to(site["cond_indep_stack"])
            surrogate = surrogate + (cost * score_function_term).sum()
            score_terms = True
    if not score_terms:  # reparameterized: the surrogate is the ELBO itself
        return surrogate
    return elbo + (surrogate - surrogate.detach())


def _mean_field_elbo(model_trace, guide_trace) -> torch.Tensor:
    """TraceMeanField_ELBO's ELBO: the analytic KL divergence of each latent site where
    one is registered, its Monte Carlo estimate otherwise."""
    elbo = 0.0
    for name, model_site in model_trace.nodes.items():
        if model_site["type"] != "sample":
            continue
        if model_site["is_observed"]:
            elbo = elbo + model_site["log_prob_sum"]
            continue
        guide_site = guide_trace.nodes[name]
        try:
            kl_qp = kl_divergence(guide_site["fn"], model_site["fn"])
        except NotImplementedError:
            elbo = elbo + model_site["log_prob_sum"]
            elbo = elbo - guide_site["score_parts"].entropy_term.sum()
            continue
        kl_qp = scale_and_mask(kl_qp, scale=guide_site["scale"], mask=guide_site["mask"])
        if torch.is_tensor(kl_qp):
            elbo = elbo - kl_qp.sum()
        else:
            elbo = elbo - kl_qp * torch.Size(guide_site["fn"].batch_shape).numel()
    for name, guide_site in guide_trace.nodes.items():  # the guide's auxiliary sites
        if guide_site["type"] == "sample" and name not in model_trace.nodes:
            elbo = elbo - guide_site["score_parts"].entropy_term.sum()
    return elbo


def _differentiable_loss(loss: Trace_ELBO, model, guide, *args, **kwargs) -> torch.Tensor:
    """``loss.differentiable_loss(model, guide, *args, **kwargs)`` of ``Trace_ELBO`` or
    ``TraceMeanField_ELBO`` (its value is the particle-averaged loss, its gradient the
    surrogate's), computed without their ``torch_item`` reads of the value, which a
    compiled graph would bake in."""
    particle_elbo = _mean_field_elbo if isinstance(loss, TraceMeanField_ELBO) else _trace_elbo
    total = 0.0
    for model_trace, guide_trace in loss._get_traces(model, guide, args, kwargs):
        total = total - particle_elbo(model_trace, guide_trace) / loss.num_particles
    return total


class ModuleSVI(OptimizerDriver):
    """``step(*args) -> float`` like :class:`pyro.infer.SVI`, on module parameters.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide taking the same arguments.
    optim : torch.optim.Optimizer or pyro.optim.PyroOptim
        A torch optimizer over the parameters to train (model and guide); Pyro params
        the model or guide registers that it does not hold join it as a new parameter
        group. Or a Pyro optimizer, which steps every traced Pyro param (the ready
        models register all their parameters).
    loss : pyro.infer.ELBO, optional
        Any ELBO with ``differentiable_loss`` (default :class:`~pyro.infer.Trace_ELBO`).
    clip_norm : float, optional
        Clip the global gradient norm before each step.
    jit_compile : bool or str
        Compile the loss once per input signature (Pyro's name for it; a string names the
        backend, ``"inductor"`` (``True``) or ``"fx"``;
        :class:`~pyro_lvm.infer.compile.CompiledFunction`: captured with ``torch.fx``,
        compiled by Inductor, guarded). Supports ``Trace_ELBO`` and
        ``TraceMeanField_ELBO``; a model the compiled path cannot replay exactly (a branch
        on a tensor's value, a Python value that keeps changing, an enclosing
        ``poutine.scale``) runs eagerly, with one
        :class:`~pyro_lvm.infer.compile.CompileWarning` saying why. Pyro's
        ``JitTrace_ELBO`` and ``JitTraceMeanField_ELBO`` are compiled this way (never with
        TorchScript); Pyro's other JIT ELBOs are refused.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: torch.optim.Optimizer | PyroOptim,
        loss: ELBO | None = None,
        clip_norm: float | None = None,
        *,
        jit_compile: bool | str = False,
    ):
        super().__init__(optim, clip_norm)
        self.model, self.guide = model, guide
        self.loss = loss if loss is not None else Trace_ELBO()
        if _is_jit(self.loss) and not isinstance(self.loss, _COMPILED_JIT):
            raise ValueError(
                f"ModuleSVI does not run {type(self.loss).__name__}: Pyro's JIT ELBOs record "
                "the model with TorchScript's deprecated tracer, which bakes Python-side "
                f"values into the graph; pass {_eager_class(self.loss).__name__}() instead"
            )
        backend = compile_backend(jit_compile) or (BACKENDS[0] if _is_jit(self.loss) else None)
        if backend is not None and not _compilable(self.loss):
            raise ValueError(
                f"jit_compile supports Trace_ELBO and TraceMeanField_ELBO (and their Jit "
                f"versions), not {type(self.loss).__name__}; pass jit_compile=False"
            )
        self.jit_compile = backend is not None
        self._compiled: CompiledFunction | None = None
        if backend is not None:
            self._compiled = CompiledFunction(
                functools.partial(_differentiable_loss, self.loss, model, guide),
                name=type(self.loss).__name__,
                state={"loss": self.loss, "model": model, "guide": guide},
                backend=backend,
            )

    def objective(self, *args, **kwargs) -> torch.Tensor:
        """Minus the ELBO of the batch, differentiable."""
        if self._compiled is not None:
            return self._compiled(*args, **kwargs)
        # never Pyro's TorchScript path: a JIT ELBO runs as its eager base class
        loss_class = _eager_class(self.loss)
        return loss_class.differentiable_loss(self.loss, self.model, self.guide, *args, **kwargs)

    @torch.no_grad()
    def evaluate_loss(self, *args, **kwargs) -> float:
        """The loss without a gradient step."""
        with pyro.poutine.block():
            if self._compiled is not None:
                return float(self._compiled(*args, **kwargs))
            loss_class = _eager_class(self.loss)
            return loss_class.loss(self.loss, self.model, self.guide, *args, **kwargs)
