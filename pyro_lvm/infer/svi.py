r"""SVI with module parameters and a plain :mod:`torch.optim` optimizer.

Pyro's :class:`pyro.infer.SVI` reads parameters from the global param store and wraps
one optimizer per tensor. pyro_lvm's models keep their parameters on ``nn.Module``
objects, so this driver differentiates ``loss.differentiable_loss(model, guide, *args)``
and steps an ordinary optimizer: checkpoints are ``state_dict``s and resume is exact.

A non-finite loss raises :class:`~pyro_lvm.infer.diagnostics.DivergenceError` *before*
the optimizer step, so the parameters never become NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO

from pyro_lvm.infer.diagnostics import check_loss, divergence_guard

__all__ = ["ModuleSVI"]


class ModuleSVI:
    """``step(*args) -> float`` like :class:`pyro.infer.SVI`, on module parameters.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide taking the same arguments.
    optim : torch.optim.Optimizer
        Optimizer over the parameters to train (model and guide).
    loss : pyro.infer.ELBO, optional
        Any ELBO with ``differentiable_loss`` (default :class:`~pyro.infer.Trace_ELBO`).
    clip_norm : float, optional
        Clip the global gradient norm before each step.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: torch.optim.Optimizer,
        loss: ELBO | None = None,
        clip_norm: float | None = None,
    ):
        self.model, self.guide, self.optim = model, guide, optim
        self.loss = loss if loss is not None else Trace_ELBO()
        self.clip_norm = clip_norm

    def _params(self) -> Iterable[torch.Tensor]:
        return (p for group in self.optim.param_groups for p in group["params"])

    def step(self, *args, **kwargs) -> float:
        """One gradient step; returns the loss (minus the ELBO, summed over the batch)."""
        self.optim.zero_grad(set_to_none=True)
        with divergence_guard():
            loss = self.loss.differentiable_loss(self.model, self.guide, *args, **kwargs)
        check_loss(loss)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self._params()), self.clip_norm)
        self.optim.step()
        return loss.item()

    @torch.no_grad()
    def evaluate_loss(self, *args, **kwargs) -> float:
        """The loss without a gradient step."""
        with pyro.poutine.block():
            return self.loss.loss(self.model, self.guide, *args, **kwargs)

    def state_dict(self) -> dict:
        return {"optim": self.optim.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state["optim"])

    def metrics(self) -> dict[str, float]:
        """Per-step diagnostics to log (none for SVI)."""
        return {}
