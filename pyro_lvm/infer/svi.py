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

from collections.abc import Callable

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.optim import PyroOptim

from pyro_lvm.infer.diagnostics import check_loss, divergence_guard
from pyro_lvm.infer.optim import ParamOptimizer

__all__ = ["ModuleSVI"]


class ModuleSVI:
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
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: torch.optim.Optimizer | PyroOptim,
        loss: ELBO | None = None,
        clip_norm: float | None = None,
    ):
        self.model, self.guide, self.optim = model, guide, optim
        self.loss = loss if loss is not None else Trace_ELBO()
        self.clip_norm = clip_norm

    @property
    def optim(self) -> torch.optim.Optimizer | PyroOptim:
        """The optimizer."""
        return self._optimizer.optim

    @optim.setter
    def optim(self, optim: torch.optim.Optimizer | PyroOptim) -> None:
        self._optimizer = ParamOptimizer(optim)

    def step(self, *args, **kwargs) -> float:
        """One gradient step; returns the loss (minus the ELBO, summed over the batch)."""
        self._optimizer.zero_grad()
        with divergence_guard(), self._optimizer.capture() as traced:
            loss = self.loss.differentiable_loss(self.model, self.guide, *args, **kwargs)
        check_loss(loss)
        loss.backward()
        self._optimizer.step(traced, self.clip_norm)
        return loss.item()

    @torch.no_grad()
    def evaluate_loss(self, *args, **kwargs) -> float:
        """The loss without a gradient step."""
        with pyro.poutine.block():
            return self.loss.loss(self.model, self.guide, *args, **kwargs)

    def state_dict(self) -> dict:
        return {"optim": self._optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._optimizer.load_state_dict(state["optim"])

    def metrics(self) -> dict[str, float]:
        """Per-step diagnostics to log (none for SVI)."""
        return {}
