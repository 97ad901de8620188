"""Divergence detection and input checks shared by every inference algorithm."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch.distributions import constraints

__all__ = [
    "DivergenceError",
    "check_loss",
    "check_inputs",
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
    r"""Raise a one-line ``ValueError`` if an observed value is NaN or outside the support
    of its site's distribution (e.g. Bernoulli data equal to 3).

    Likelihood estimators run with Pyro's argument validation off for speed; without this
    check such data give a finite, meaningless number. The check reads a trace that the
    estimator records anyway, so it costs no extra model evaluation. A Bernoulli built
    with ``validate_args=False`` (Pyro's VAE example and pyro_lvm's own likelihood feed
    grey levels to it: the "continuous cross-entropy") is checked against :math:`[0, 1]`
    instead of :math:`\{0, 1\}`.
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
        if _relaxed_bernoulli(fn):
            support = constraints.unit_interval
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


def _relaxed_bernoulli(fn) -> bool:
    """A Bernoulli (possibly wrapped) that does not validate its values."""
    declined = False
    while fn is not None:
        declined = declined or getattr(fn, "_validate_args", None) is False
        if isinstance(fn, torch.distributions.Bernoulli):
            return declined
        fn = getattr(fn, "base_dist", None)
    return False


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


def _first_parameter(functions) -> torch.Tensor | None:
    """A floating-point parameter of the module that owns one of ``functions`` (a bound
    method of an ``nn.Module``, or the module itself), if any."""
    for fn in functions:
        owner = getattr(fn, "__self__", fn)
        if isinstance(owner, torch.nn.Module):
            for tensor in (*owner.parameters(), *owner.buffers()):
                if tensor.is_floating_point():
                    return tensor
    return None


def _first_row(bad: torch.Tensor) -> int:
    return int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0]) if bad.dim() else 0


def check_inputs(args: tuple, kwargs: dict, *functions) -> None:
    """One-line ``ValueError`` for model arguments a likelihood estimator cannot take,
    checked before a guide or encoder turns them into an obscure error: a NumPy array, a
    tensor with no rows, NaN or infinite values, and (when ``functions`` are methods of an
    ``nn.Module``) a floating-point dtype or device other than the module's."""
    param = _first_parameter(functions)
    for where, value in [*enumerate(args), *kwargs.items()]:
        label = f"argument {where}" if isinstance(where, int) else f"argument {where!r}"
        if isinstance(value, np.ndarray):
            dtype = param.dtype if param is not None else torch.get_default_dtype()
            raise ValueError(
                f"{label} of the model is a numpy.ndarray; pass a torch tensor, "
                f"torch.as_tensor(x, dtype={dtype})"
            )
        if not torch.is_tensor(value):
            continue
        if value.dim() and value.shape[0] == 0:
            raise ValueError(f"{label} of the model has 0 rows; pass at least one datapoint")
        if not value.is_floating_point():
            continue
        nan = torch.isnan(value)
        if nan.any():
            raise ValueError(
                f"{label} of the model contains NaN ({int(nan.sum())} values, first in row "
                f"{_first_row(nan)}); remove or impute them"
            )
        inf = torch.isinf(value)
        if inf.any():
            raise ValueError(
                f"{label} of the model contains infinite values ({int(inf.sum())}, first in "
                f"row {_first_row(inf)}); remove, clip or impute them"
            )
        if param is not None and value.dtype != param.dtype:
            raise ValueError(
                f"{label} of the model is {value.dtype} but the model's parameters are "
                f"{param.dtype}; pass x.to({param.dtype}) (or convert the model)"
            )
        if param is not None and value.device != param.device:
            raise ValueError(
                f"{label} of the model is on {value.device} but the model's parameters are "
                f"on {param.device}; pass x.to({str(param.device)!r})"
            )
