r"""A non-iterative fit (closed form, EM) behind the trainer's SVI-like interface.

Some models are fitted once on the whole training set rather than by minibatch steps
(PPCA's eigendecomposition, EM on the full covariance). :class:`ClosedFormFit` wraps such
a fit so the trainer, checkpointing and evaluation treat it like any other inference
algorithm:

1. the trainer calls ``inference.prepare(train_x)`` once, before the first epoch (and
   again after restoring a checkpoint: a fitted state makes it a no-op);
2. ``step(x)`` then changes nothing and returns the batch-summed loss, so training curves
   and ``metrics.json`` stay meaningful.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ClosedFormFit"]


class ClosedFormFit:
    """Inference driver for a one-shot fit on the full training data.

    Parameters
    ----------
    fit : callable
        ``fit(train_x)``: sets the model's parameters from the whole training set (e.g.
        ``PPCA.fit_closed_form``).
    log_likelihood : callable
        ``log_likelihood(x) -> (B,)`` exact per-datapoint :math:`\\log p(x)`; the loss is
        its negative batch sum.
    """

    def __init__(
        self,
        fit: Callable[[torch.Tensor], object],
        log_likelihood: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.fit, self.log_likelihood = fit, log_likelihood
        self.fitted = False

    def prepare(self, train_x: torch.Tensor) -> None:
        """Fit on the full training set ``train_x`` (shape ``(N, D)``) unless already fitted."""
        if not self.fitted:
            self.fit(train_x)
            self.fitted = True

    @torch.no_grad()
    def evaluate_loss(self, x: torch.Tensor) -> float:
        """:math:`-\\sum_n \\log p(x_n)` on the batch."""
        return -self.log_likelihood(x).sum().item()

    def step(self, x: torch.Tensor) -> float:
        """No update (the fit happened in :meth:`prepare`); returns the batch loss."""
        if not self.fitted:
            raise RuntimeError(
                "ClosedFormFit.step called before prepare(train_x); the trainer must call "
                "inference.prepare(train_x) with the full training data first"
            )
        return self.evaluate_loss(x)

    def state_dict(self) -> dict:
        return {"fitted": self.fitted}

    def load_state_dict(self, state: dict) -> None:
        self.fitted = bool(state["fitted"])

    def metrics(self) -> dict[str, float]:
        return {}
