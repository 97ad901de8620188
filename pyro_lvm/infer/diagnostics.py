"""Divergence detection shared by every inference algorithm."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch

__all__ = [
    "DivergenceError",
    "check_loss",
    "check_finite_data",
    "check_observations",
    "divergence_guard",
]


class DivergenceError(FloatingPointError):
    """A loss or potential became NaN or infinite during training."""


def check_loss(loss: torch.Tensor, what: str = "loss") -> None:
    """Raise :class:`DivergenceError` (one line, with a fix) if ``loss`` is not finite."""
    # a scalar loss (the usual case): one read, no device ops
    finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss).all())
    if not finite:
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


def check_observations(trace) -> None:
    """Raise a one-line ``ValueError`` if an observed value is NaN or outside the support
    of its site's distribution (e.g. Bernoulli data equal to 3).

    Likelihood estimators run with Pyro's argument validation off for speed; without this
    check such data give a finite, meaningless number. The check reads a trace that the
    estimator records anyway, so it costs no extra model evaluation.
    """
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        value, fn = site["value"], site["fn"]
        if not torch.is_tensor(value) or not value.is_floating_point():
            continue
        if torch.isnan(value).any():
            raise ValueError(f"observed site {name!r} contains NaN; remove or impute them")
        support = getattr(fn, "support", None)
        if support is None:
            continue
        try:
            ok = support.check(value)
        except (NotImplementedError, RuntimeError):  # supports that cannot check a value
            continue
        if not bool(ok.all()):
            example = _offending_value(support, value)
            raise ValueError(
                f"observed site {name!r} has values outside the support {support} of its "
                f"{type(fn).__name__} (e.g. {example:g}); map the data for this likelihood "
                "(DataBundle.for_likelihood) or choose another likelihood"
            )


def _offending_value(support, value: torch.Tensor) -> float:
    """One value that violates ``support``, looked up elementwise where possible."""
    inner = support
    while hasattr(inner, "base_constraint"):  # constraints.independent
        inner = inner.base_constraint
    ok = inner.check(value)
    if ok.shape != value.shape:  # an event-level constraint: report the first row's value
        ok = support.check(value).reshape(-1)
        return float(value.reshape(ok.numel(), -1)[~ok][0, 0])
    return float(value[~ok][0])


def check_finite_data(args: tuple, kwargs: dict) -> None:
    """One-line ``ValueError`` if a floating-point tensor argument holds NaN (checked
    before a guide or encoder turns it into an obscure distribution-parameter error)."""
    for i, value in enumerate((*args, *kwargs.values())):
        if torch.is_tensor(value) and value.is_floating_point() and torch.isnan(value).any():
            raise ValueError(
                f"argument {i} of the model contains NaN ({int(torch.isnan(value).sum())} "
                "values); remove or impute them"
            )
