r"""What a likelihood expects of the data, declared by the data layer.

A likelihood names its :class:`DataFormat` (``BernoulliLikelihood.data_format is
BINARY``); :meth:`pyro_lvm.data.DataBundle.for_likelihood` applies it. The data layer
thereby knows data formats, never models: the mapping from intensities in ``[0, 1]`` to
what a likelihood reads lives here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "DataFormat",
    "BINARY",
    "EIGHT_BIT_SYMMETRIC",
    "REAL",
    "FORMATS",
    "check_finite",
    "to_8bit_symmetric",
    "resolve_format",
]


def check_finite(x: torch.Tensor, what: str = "data") -> None:
    """Raise a one-line ``ValueError`` if ``x`` holds NaN or infinite values."""
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{what} contains {n_bad} NaN or infinite values; clean or impute them first"
        )


def to_8bit_symmetric(x: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """Map intensities in [0, 1] to the ``levels``-level grid in [-1, 1] (bin centres of
    :class:`~pyro_lvm.models.likelihoods.DiscretizedLogistic`)."""
    k = torch.round(x.clamp(0, 1) * (levels - 1))
    return k * 2 / (levels - 1) - 1


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class DataFormat(NamedTuple):
    """How intensities become a likelihood's observations.

    Attributes
    ----------
    name : str
        Identifier (``binary``, ``8bit-symmetric``, ``real``).
    prepare : callable
        Applied to every split (e.g. 8-bit quantisation to ``[-1, 1]``).
    binarize : bool
        Intensities are Bernoulli probabilities: training binarizes each minibatch
        afresh, evaluation splits once with a fixed seed.
    unit_interval : bool
        The raw data must lie in ``[0, 1]``.
    """

    name: str
    prepare: Callable[[torch.Tensor], torch.Tensor]
    binarize: bool
    unit_interval: bool


BINARY = DataFormat("binary", _identity, binarize=True, unit_interval=True)
EIGHT_BIT_SYMMETRIC = DataFormat(
    "8bit-symmetric", to_8bit_symmetric, binarize=False, unit_interval=True
)
REAL = DataFormat("real", _identity, binarize=False, unit_interval=False)
FORMATS = {f.name: f for f in (BINARY, EIGHT_BIT_SYMMETRIC, REAL)}
#: the CLI's likelihood names, accepted where a format is expected (older call sites)
_ALIASES = {"bernoulli": BINARY, "logistic": EIGHT_BIT_SYMMETRIC, "gaussian": REAL}


def resolve_format(spec) -> DataFormat:
    """A :class:`DataFormat` from a format, anything with a ``data_format`` attribute (a
    likelihood object or class), or a name (a format's, or a CLI likelihood name)."""
    if isinstance(spec, DataFormat):
        return spec
    if hasattr(spec, "data_format"):
        return spec.data_format
    if isinstance(spec, str):
        found = FORMATS.get(spec) or _ALIASES.get(spec)
        if found is not None:
            return found
        names = ", ".join([*FORMATS, *_ALIASES])
        raise ValueError(f"unknown data format {spec!r}; choose one of {names}")
    raise TypeError(
        f"expected a likelihood, a DataFormat or a format name, got {type(spec).__name__}"
    )
