"""Divergence detection shared by every inference algorithm."""

from __future__ import annotations

import torch

__all__ = ["DivergenceError", "check_loss"]


class DivergenceError(FloatingPointError):
    """A loss or potential became NaN or infinite during training."""


def check_loss(loss: torch.Tensor, what: str = "loss") -> None:
    """Raise :class:`DivergenceError` (one line, with a fix) if ``loss`` is not finite."""
    if not torch.isfinite(loss).all():
        raise DivergenceError(
            f"the {what} became {float(loss.detach().sum())}: training diverged; lower the "
            "learning rate (--lr) or restart from the last checkpoint"
        )
