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

from pyro_lvm.infer.driver import OptimizerDriver

__all__ = ["ModuleSVI"]

_JIT_ELBOS = tuple(
    getattr(pyro.infer, name)
    for name in (
        "JitTrace_ELBO",
        "JitTraceGraph_ELBO",
        "JitTraceEnum_ELBO",
        "JitTraceMeanField_ELBO",
        "JitTraceTMC_ELBO",
    )
    if hasattr(pyro.infer, name)
)


def _is_jit(loss: ELBO) -> bool:
    return isinstance(loss, _JIT_ELBOS)


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
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: torch.optim.Optimizer | PyroOptim,
        loss: ELBO | None = None,
        clip_norm: float | None = None,
    ):
        super().__init__(optim, clip_norm)
        self.model, self.guide = model, guide
        self.loss = loss if loss is not None else Trace_ELBO()
        # Pyro's JIT ELBOs (JitTrace_ELBO, ...) compile the param store entries as inputs
        self.declare_held = not _is_jit(self.loss)

    def objective(self, *args, **kwargs) -> torch.Tensor:
        """Minus the ELBO of the batch, differentiable."""
        return self.loss.differentiable_loss(self.model, self.guide, *args, **kwargs)

    @torch.no_grad()
    def evaluate_loss(self, *args, **kwargs) -> float:
        """The loss without a gradient step."""
        with pyro.poutine.block():
            return self.loss.loss(self.model, self.guide, *args, **kwargs)
