r"""The base of every gradient-based training driver: one optimizer step, written once.

Pyro's :class:`pyro.infer.SVI` is one driver over any :class:`~pyro.infer.ELBO`;
pyro_lvm's drivers (:class:`~pyro_lvm.infer.svi.ModuleSVI`,
:class:`~pyro_lvm.infer.lae.LAE`, :class:`~pyro_lvm.infer.dlgm.DLGM`,
:class:`~pyro_lvm.infer.autoencoder.AutoencoderFit`,
:class:`~pyro_lvm.infer.marginal.MarginalLikelihoodGD`) differ only in the loss they
differentiate. :class:`OptimizerDriver` owns what they share:

1. clear gradients; trace the Pyro params the loss uses (:class:`ParamOptimizer`);
2. evaluate the loss inside :func:`~pyro_lvm.infer.diagnostics.divergence_guard`;
3. refuse a non-finite loss *before* any parameter moves
   (:class:`~pyro_lvm.infer.diagnostics.DivergenceError`);
4. backward, clip the global gradient norm, step; data parallel (inside
   :func:`~pyro_lvm.collective.data_parallel`), the gradients and the loss are
   summed over ranks before the check, so every rank takes the union batch's step;
5. ``state_dict`` / ``load_state_dict`` of the optimizer plus the driver's own state.

A driver implements :meth:`OptimizerDriver.objective` (the differentiable objective of a
batch) and, when it keeps state besides the optimizer, :meth:`_extra_state` /
:meth:`_load_extra_state`. This is the ``Inference`` protocol the trainer consumes:
``step``, ``evaluate_loss``, ``state_dict``, ``load_state_dict``, ``metrics``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.optim import PyroOptim
from torch import Tensor

from pyro_lvm.collective import all_reduce_gradients, current_collective
from pyro_lvm.infer.diagnostics import DivergenceError, check_loss, divergence_guard
from pyro_lvm.infer.optim import ParamOptimizer

__all__ = ["OptimizerDriver"]


class OptimizerDriver:
    """One optimizer step on a driver-defined loss.

    Parameters
    ----------
    optim : torch.optim.Optimizer or pyro.optim.PyroOptim
        The optimizer (see :class:`~pyro_lvm.infer.optim.ParamOptimizer` for which Pyro
        params join it).
    clip_norm : float, optional
        Clip the global gradient norm before each step.
    exclude : iterable of Tensor
        Tensors the optimizer must never step (a Markov chain's state).
    extra : dict of str to Tensor, optional
        Named parameters a PyroOptim trains besides the traced Pyro params.
    """

    #: how the loss is named in error messages
    loss_name = "loss"
    #: compute the global gradient norm every step even without clipping (it costs a
    #: reduction over every gradient; drivers that report it in ``metrics`` set this)
    track_grad_norm = False
    #: let the ready models skip re-registering parameters the optimizer holds
    #: (:mod:`pyro_lvm._registration`); compiled losses find them as graph leaves
    declare_held = True
    #: data parallel: random draws (guide noise) are per datapoint, so each rank draws its
    #: own (see :class:`~pyro_lvm.experiments.trainer.Trainer`)
    data_parallel_rng = "per_rank"
    #: data parallel: the loss value is already the union batch's (LAE: its potentials are
    #: summed over ranks inside the kernel), so only the gradients are summed
    loss_is_global = False

    def __init__(
        self,
        optim: torch.optim.Optimizer | PyroOptim,
        clip_norm: float | None = None,
        exclude=(),
        extra: dict[str, Tensor] | None = None,
    ):
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        self._exclude, self._extra = tuple(exclude), extra
        self.optim = optim
        self.clip_norm = clip_norm
        #: global gradient norm of the latest step before clipping (NaN before any step, or
        #: when neither clipping nor ``track_grad_norm`` asks for it)
        self.grad_norm = float("nan")
        #: whether the parameters may have moved (a step taken, or a state restored): a
        #: non-finite loss before that cannot be the learning rate's doing
        self._moved = False

    def _exclude_more(self, tensors) -> None:
        """Never step ``tensors`` from now on (a chain found on the first batch)."""
        tensors = [t for t in tensors if all(t is not e for e in self._exclude)]
        if tensors:
            self._exclude = (*self._exclude, *tensors)
            self._optimizer.exclude(tensors)

    @property
    def optim(self) -> torch.optim.Optimizer | PyroOptim:
        """The optimizer."""
        return self._optimizer.optim

    @optim.setter
    def optim(self, optim: torch.optim.Optimizer | PyroOptim) -> None:
        self._optimizer = ParamOptimizer(optim, exclude=self._exclude, extra=self._extra)

    # -- what a driver defines ------------------------------------------------------------
    def objective(self, *args, **kwargs) -> Tensor:
        """The differentiable scalar loss of a batch (summed over datapoints)."""
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- the shared step ------------------------------------------------------------------
    def step(self, *args, **kwargs) -> float:
        """One gradient step; returns the batch's loss before the step."""
        return float(self._descend(lambda: self.objective(*args, **kwargs), (args, kwargs)))

    def _descend(self, closure, inputs=((), {})) -> Tensor:
        """:meth:`_step` of ``closure``; a non-finite loss is reported with its cause
        where it can be told (non-finite ``inputs``, or before any update)."""
        try:
            loss = self._step(closure)
        except DivergenceError as err:
            raise self._diagnosed(err, inputs) from None
        self._moved = True
        return loss

    def _diagnosed(self, err: DivergenceError, inputs) -> DivergenceError:
        args, kwargs = inputs
        for where, value in [*enumerate(args), *kwargs.items()]:
            if torch.is_tensor(value) and value.is_floating_point():
                bad = ~torch.isfinite(value)
                if bad.any():
                    row = (
                        int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0]) if bad.dim() else 0
                    )
                    return DivergenceError(
                        f"the {self.loss_name} is not finite because the data are not: "
                        f"argument {where} of step() holds {int(bad.sum())} NaN or infinite "
                        f"values (first in row {row}); clean or impute them (the learning "
                        "rate is not the cause)"
                    )
        if not self._moved:
            return DivergenceError(
                f"the {self.loss_name} is not finite at the first step, before any update "
                "(so not the learning rate's doing): the model maps finite data and its "
                "initial parameters to NaN or infinity (e.g. NaN logits, a zero or negative "
                "scale); check the model's output at initialisation"
            )
        return err

    def _step(self, closure) -> Tensor:
        """Steps 1-4 of the module docstring around ``closure() -> loss``; returns the
        detached loss.

        A driver whose parts have different gradient paths (DLGM: the decoder from the
        chain's end point, the encoder from the ELBO) returns ``(reported_loss,
        backward)`` instead, ``backward()`` filling the gradients; it runs where
        ``loss.backward()`` would.
        """
        self._optimizer.zero_grad()
        with (
            divergence_guard(self.loss_name),
            self._optimizer.capture(self.declare_held) as traced,
        ):
            out = closure()
        loss, backward = out if isinstance(out, tuple) else (out, out.backward)
        if current_collective() is None:
            check_loss(loss, self.loss_name)
            backward()
        else:
            # data parallel: backward on this rank's shard, then one collective sums the
            # gradients and the loss, so every rank checks and steps on the union batch's
            backward()
            params = self._optimizer.params(traced)
            if self.loss_is_global:
                all_reduce_gradients(params)
            else:
                (loss,) = all_reduce_gradients(params, loss.detach())
            check_loss(loss, self.loss_name)
        self._clip_and_step(traced)
        return loss.detach()

    def _clip_and_step(self, traced: set[Tensor]) -> None:
        if self.clip_norm is not None or self.track_grad_norm:
            params = [p for p in self._optimizer.params(traced) if p.grad is not None]
            if params:
                max_norm = self.clip_norm if self.clip_norm is not None else math.inf
                self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self._optimizer.step(traced)

    @torch.no_grad()
    def evaluate_loss(self, *args, **kwargs) -> float:
        """The loss of a batch, without an update."""
        return float(self.objective(*args, **kwargs))

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state and the driver's own (step sizes, baselines...)."""
        return {"optim": self._optimizer.state_dict(), **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the driver's own state first: it may decide what the optimizer holds (LAE)
        self._load_extra_state(state)
        self._optimizer.load_state_dict(state["optim"])
        self._moved = True

    def metrics(self) -> dict[str, float]:
        """Diagnostics of the latest steps, for logs and progress bars (default none)."""
        return {}
