r"""Per-datapoint importance-weighted likelihood estimates and ELBOs.

For a model :math:`p(x, z)` and a proposal (guide) :math:`q(z \mid x)`, with
:math:`z^{(k)} \sim q(z \mid x_i)`,

.. math::

    \log w_i^{(k)} = \log p(x_i, z^{(k)}) - \log q(z^{(k)} \mid x_i), \qquad
    \hat L_K(x_i) = \log \frac1K \sum_{k=1}^K w_i^{(k)} .

:math:`\mathbb E[\hat L_K] \le \log p(x_i)`, increasing in :math:`K` and converging to
:math:`\log p(x_i)` (Burda et al. 2016); :math:`\hat L_1` is the ELBO. One function serves
every model: any Pyro ``model``/``guide`` pair with a *data plate*, the outermost plate
that encloses every observed site, over the rows of the data (wherever it sits, sized or
not). Site scales and masks count (``poutine.mask`` on row :math:`i`'s observation makes
its estimate exactly 0). A model without a data plate does not declare its rows
independent: ``per_datapoint=False`` estimates :math:`\log p(X)` of the whole batch from
the whole program's weights instead (see :mod:`pyro_lvm.infer.particles`).

Particles are vectorized in an extra plate to the left of the model's dimensions and
processed in chunks, so ``K = 1000`` on a test set fits in memory. A model that cannot
take that dimension (a ``BatchNorm`` layer, an ``.expand`` to a fixed shape) is run one
particle per call instead, which gives the same numbers: the first vectorized chunk is
checked against the model as written.

References
----------
Burda, Grosse, Salakhutdinov (2016), "Importance Weighted Autoencoders", ICLR.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro import poutine

from pyro_lvm.infer.diagnostics import check_inputs
from pyro_lvm.infer.particles import (
    inspect_particles,
    log_weights,
    matches_as_written,
    total,
    trace_particles,
)

__all__ = ["log_importance_weights", "iwae_log_likelihood", "elbo_per_datapoint"]


def _trace_bytes(trace) -> int:
    """Bytes of the distinct tensors a trace holds: sample values, cached log-densities
    and the distributions' parameters (found through ``Independent``/``expand`` wrappers)."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen[id(t)] = t.numel() * t.element_size()

    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        add(site["value"])
        add(site.get("log_prob"))
        fn = site["fn"]
        while fn is not None:
            for v in vars(fn).values():
                add(v)
            fn = getattr(fn, "base_dist", None)
    return sum(seen.values())


def _check_options(num_samples: int, chunk_size: int, chunk_bytes: int | None) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes}")


def _no_data_plate() -> ValueError:
    return ValueError(
        "no plate encloses every observed site of the model, so its rows are not declared "
        "independent and log p(x_i) per row does not exist; put the rows in "
        "`with pyro.plate('data', len(x)):` in model and guide, or pass "
        "per_datapoint=False for log p(X) of the whole batch"
    )


def _not_vectorizable() -> ValueError:
    return ValueError(
        "the model or guide gives other log-densities with a particle dimension than as "
        "written (a BatchNorm layer, an .expand to a fixed shape, a reshape that mixes "
        "particles); pass vectorize_particles=False (or None) to run one particle per call"
    )


def log_importance_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1,
    max_plate_nesting: int | None = None,
    chunk_size: int = 100,
    chunk_bytes: int | None = None,
    per_datapoint: bool | None = True,
    vectorize_particles: bool | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""Log importance weights :math:`\log w_i^{(k)}`, shape ``(num_samples, B)``.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide; the guide samples every latent site of the model and
        nothing else (a one-line error otherwise).
    *args, **kwargs
        Passed to both (typically the data batch ``x`` of shape ``(B, D)``).
    num_samples : int
        Number of importance samples :math:`K`.
    max_plate_nesting : int, optional
        At least this many batch dimensions in the model (default: as many as a trace of
        the model shows); particles go left of them.
    chunk_size : int
        Particles drawn per vectorized pass (bounds memory at ``chunk_size * B`` latents).
    chunk_bytes : int, optional
        A memory budget per pass instead: a first pass with one particle measures the
        bytes its traces hold (site values, log-densities and distribution parameters,
        e.g. the decoder's ``(B, D)`` output: what stays alive under ``no_grad``), and
        every later pass draws as many particles as fit ``chunk_bytes`` (at least one,
        at most ``chunk_size``). Peak memory then stays near the budget whatever the
        number of datapoints ``B``, where a fixed ``chunk_size`` grows with ``B``.
    per_datapoint : bool or None
        ``True``: per row of the data plate (a model without one is a one-line error).
        ``False``: the whole program's weights, shape ``(num_samples,)``, whose
        :math:`\log \frac1K \sum_k w^{(k)}` estimates :math:`\log p(X)` of the batch.
        ``None``: per row when the model has a data plate, else the whole program.
    vectorize_particles : bool or None
        ``None`` (default): vectorize, unless the first vectorized chunk fails or differs
        from the model as written, then one particle per call. ``True``: vectorize (a
        one-line error where that differs). ``False``: one particle per call.
    """
    _check_options(num_samples, chunk_size, chunk_bytes)
    check_inputs(args, kwargs, model, guide)
    with torch.no_grad(), poutine.block():
        layout = inspect_particles(model, guide, args, kwargs, max_plate_nesting)
        if per_datapoint and layout.data_plate is None:
            raise _no_data_plate()
        by_row = layout.data_plate is not None if per_datapoint is None else per_datapoint
        pair = (model, guide, args, kwargs)
        return _draw(
            pair, layout, by_row, num_samples, chunk_size, chunk_bytes, vectorize_particles
        )


def _draw(pair, layout, by_row, num_samples, chunk_size, chunk_bytes, vectorize) -> torch.Tensor:
    """``num_samples`` log weights, vectorized in chunks or one particle per call."""
    model, guide, args, kwargs = pair
    chunks, remaining = [], num_samples
    checked = vectorize is False
    per_particle = None
    while remaining > 0:
        if vectorize is False:
            traces = trace_particles(model, guide, args, kwargs, layout.num_dims, None)
            chunks.append(total(log_weights(*traces, layout, by_row), 1, layout, by_row))
            remaining -= 1
            continue
        k = min(chunk_size, remaining)
        if chunk_bytes is not None:
            k = 1 if per_particle is None else max(1, min(k, chunk_bytes // per_particle))
        try:
            model_trace, guide_trace = trace_particles(
                model, guide, args, kwargs, layout.num_dims, k
            )
            terms = log_weights(model_trace, guide_trace, layout, by_row)
        except torch.OutOfMemoryError:
            raise
        except Exception:
            # the model cannot take a particle dimension (found on the first chunks)
            if checked or vectorize:
                raise
            vectorize = False
            continue
        if not checked:
            if not matches_as_written(*pair, layout, guide_trace, terms, by_row):
                if vectorize:
                    raise _not_vectorizable()
                vectorize = False
                continue
            # one particle cannot show particles mixing: check until a chunk has two
            checked = k > 1 or k == remaining
        chunks.append(total(terms, k, layout, by_row))
        remaining -= k
        if chunk_bytes is not None and per_particle is None:
            per_particle = max(1, _trace_bytes(guide_trace) + _trace_bytes(model_trace))
    return torch.cat(chunks, dim=0)


def iwae_log_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    max_plate_nesting: int | None = None,
    chunk_size: int = 100,
    chunk_bytes: int | None = None,
    per_datapoint: bool | None = True,
    vectorize_particles: bool | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""Per-datapoint importance-weighted estimate :math:`\hat L_K(x_i)` of
    :math:`\log p(x_i)` in nats, shape ``(B,)``; with ``per_datapoint=False`` the
    estimate of :math:`\log p(X)` of the whole batch (a 0-d tensor).

    A stochastic lower bound in expectation; tight as :math:`K \to \infty` when the guide's
    support covers the posterior. See :func:`log_importance_weights` for the arguments.
    """
    log_w = log_importance_weights(
        model,
        guide,
        *args,
        num_samples=num_samples,
        max_plate_nesting=max_plate_nesting,
        chunk_size=chunk_size,
        chunk_bytes=chunk_bytes,
        per_datapoint=per_datapoint,
        vectorize_particles=vectorize_particles,
        **kwargs,
    )
    return log_w.logsumexp(0) - math.log(num_samples)


def elbo_per_datapoint(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1,
    max_plate_nesting: int | None = None,
    chunk_size: int = 100,
    vectorize_particles: bool | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""Per-datapoint Monte Carlo ELBO :math:`\frac1K\sum_k \log w_i^{(k)}`, shape ``(B,)``."""
    log_w = log_importance_weights(
        model,
        guide,
        *args,
        num_samples=num_samples,
        max_plate_nesting=max_plate_nesting,
        chunk_size=chunk_size,
        vectorize_particles=vectorize_particles,
        **kwargs,
    )
    return log_w.mean(0)
