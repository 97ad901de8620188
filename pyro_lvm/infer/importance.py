r"""Per-datapoint importance-weighted likelihood estimates and ELBOs.

For a model :math:`p(x, z)` and a proposal (guide) :math:`q(z \mid x)`, with
:math:`z^{(k)} \sim q(z \mid x_i)`,

.. math::

    \log w_i^{(k)} = \log p(x_i, z^{(k)}) - \log q(z^{(k)} \mid x_i), \qquad
    \hat L_K(x_i) = \log \frac1K \sum_{k=1}^K w_i^{(k)} .

:math:`\mathbb E[\hat L_K] \le \log p(x_i)`, increasing in :math:`K` and converging to
:math:`\log p(x_i)` (Burda et al. 2016); :math:`\hat L_1` is the ELBO. One function serves
every model: any Pyro ``model``/``guide`` pair whose sites live inside a data plate (the
outermost plate, at ``dim=-max_plate_nesting``) over the rows of the data. Particles are
vectorized in an extra plate to the left and processed in chunks, so ``K = 1000`` on a
test set fits in memory.

References
----------
Burda, Grosse, Salakhutdinov (2016), "Importance Weighted Autoencoders", ICLR.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyro_lvm.infer.diagnostics import check_finite_data, check_observations

__all__ = ["log_importance_weights", "iwae_log_likelihood", "elbo_per_datapoint"]


def _per_datapoint(trace, kind: str, num_particles: int, max_plate_nesting: int) -> torch.Tensor:
    """Sum log-probs of ``kind`` sites ("model" or "guide") to shape (K, B)."""
    total = 0.0
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if kind == "guide" and site["is_observed"]:
            continue
        lp = site["fn"].log_prob(site["value"]) * site["scale"]
        # left-pad to (K, plate dims...) so the data plate is always dim 1
        lp = lp.reshape((1,) * (max_plate_nesting + 1 - lp.dim()) + lp.shape)
        if lp.shape[0] != num_particles and not site["is_observed"]:
            raise ValueError(
                f"site {name!r} is outside the particle plate; per-datapoint estimates need "
                "every latent site inside the model's data plate"
            )
        lp = lp.sum(dim=tuple(range(2, lp.dim()))) if lp.dim() > 2 else lp
        total = total + lp
    return total


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


def log_importance_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1,
    max_plate_nesting: int = 1,
    chunk_size: int = 100,
    chunk_bytes: int | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""Log importance weights :math:`\log w_i^{(k)}`, shape ``(num_samples, B)``.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide; the guide proposes every latent site of the model.
    *args, **kwargs
        Passed to both (typically the data batch ``x`` of shape ``(B, D)``).
    num_samples : int
        Number of importance samples :math:`K`.
    max_plate_nesting : int
        Plates in the model; the data plate is the outermost, at ``dim=-max_plate_nesting``.
    chunk_size : int
        Particles drawn per vectorized pass (bounds memory at ``chunk_size * B`` latents).
    chunk_bytes : int, optional
        A memory budget per pass instead: a first pass with one particle measures the
        bytes its traces hold (site values, log-densities and distribution parameters,
        e.g. the decoder's ``(B, D)`` output: what stays alive under ``no_grad``), and
        every later pass draws as many particles as fit ``chunk_bytes`` (at least one,
        at most ``chunk_size``). Peak memory then stays near the budget whatever the
        number of datapoints ``B``, where a fixed ``chunk_size`` grows with ``B``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes}")
    check_finite_data(args, kwargs)
    chunks = []
    remaining = num_samples
    with torch.no_grad(), poutine.block():
        per_particle = None
        while remaining > 0:
            k = min(chunk_size, remaining)
            if chunk_bytes is not None:
                k = 1 if per_particle is None else max(1, min(k, chunk_bytes // per_particle))
            plate = pyro.plate("_importance_particles", k, dim=-(max_plate_nesting + 1))
            guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(plate(model), trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            if not chunks:
                check_observations(model_trace)
            log_p = _per_datapoint(model_trace, "model", k, max_plate_nesting)
            log_q = _per_datapoint(guide_trace, "guide", k, max_plate_nesting)
            log_w = log_p - log_q
            chunks.append(log_w.expand(k, *log_w.shape[1:]))
            remaining -= k
            if chunk_bytes is not None and per_particle is None:
                per_particle = max(1, _trace_bytes(guide_trace) + _trace_bytes(model_trace))
    return torch.cat(chunks, dim=0)


def iwae_log_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    max_plate_nesting: int = 1,
    chunk_size: int = 100,
    chunk_bytes: int | None = None,
    **kwargs,
) -> torch.Tensor:
    r"""Per-datapoint importance-weighted estimate :math:`\hat L_K(x_i)` of
    :math:`\log p(x_i)` in nats, shape ``(B,)``.

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
        **kwargs,
    )
    return log_w.logsumexp(0) - math.log(num_samples)


def elbo_per_datapoint(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1,
    max_plate_nesting: int = 1,
    chunk_size: int = 100,
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
        **kwargs,
    )
    return log_w.mean(0)
