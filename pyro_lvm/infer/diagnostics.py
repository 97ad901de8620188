"""Divergence detection shared by every inference algorithm."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

__all__ = ["DivergenceError", "check_loss", "divergence_guard"]


class DivergenceError(FloatingPointError):
    """A loss or potential became NaN or infinite during training."""


def check_loss(loss: torch.Tensor, what: str = "loss") -> None:
    """Raise :class:`DivergenceError` (one line, with a fix) if ``loss`` is not finite."""
    if not torch.isfinite(loss).all():
        raise DivergenceError(
            f"the {what} became {float(loss.detach().sum())}: training diverged; lower the "
            "learning rate (--lr) or restart from the last checkpoint"
        )


@contextmanager
def divergence_guard(what: str = "loss"):
    """Turn a distribution's argument-validation error about NaN parameters (what torch
    raises first when a network's output goes NaN) into a :class:`DivergenceError`."""
    try:
        with warnings.catch_warnings():
            # Pyro warns "Encountered NaN" before returning a NaN loss; check_loss reports it
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            yield
    except ValueError as err:
        if "found invalid values" in str(err) and "nan" in str(err).lower():
            raise DivergenceError(
                f"the {what} became NaN (a distribution got NaN parameters): training "
                "diverged; lower the learning rate (--lr) or restart from the last checkpoint"
            ) from None
        raise
