r"""Data parallelism for the inference drivers: one collective, used where sums cross ranks.

Data-parallel training splits every global minibatch :math:`B` into disjoint shards
:math:`B_1, \dots, B_R`, one per process (rank). Every loss in pyro_lvm is a *sum* over
the rows it is given (the negative ELBO, the ALD potential, the baselines' fitting loss),
so the union batch's loss and its gradient are the **sums** over ranks,

.. math::

    \mathcal L(B) = \sum_r \mathcal L(B_r), \qquad
    \nabla \mathcal L(B) = \sum_r \nabla \mathcal L(B_r),

and a step that sums gradients (not averages them) is the single-process step on the union
batch. Terms that are not per-datapoint (a prior on a global latent outside the data
plate) would be counted once per rank; the ready models have none.

The library never imports a launcher: the trainer enters :func:`data_parallel` with a
:class:`Collective` (the Lightning Fabric one lives in
:mod:`pyro_lvm.experiments.fabric`) and the pieces that must agree across ranks ask
for it with :func:`current_collective`:

* :meth:`~pyro_lvm.infer.optim.ParamOptimizer.reduce_gradients` sums the gradients (and
  the loss) in one collective before every optimizer step;
* :class:`~pyro_lvm.infer.baselines.RunningAverageBaseline`,
  :class:`~pyro_lvm.infer.baselines.SignalNormalization` and
  :class:`~pyro_lvm.models.centering.FeatureCentering` update their running statistics
  from union-batch moments;
* the amortized Langevin kernel sums the potential and its gradient
  (:func:`reduce_potential`, its ``reduce_fn`` hook, which :class:`~pyro_lvm.infer.LAE`
  installs).

Outside :func:`data_parallel` every helper is the identity: single-process code is
unchanged and pays nothing.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "Collective",
    "all_gather_cat",
    "all_reduce_gradients",
    "current_collective",
    "data_parallel",
    "global_mean",
    "rank_seed",
    "reduce_potential",
    "reduce_sum",
    "shard_bounds",
]


class Collective(Protocol):
    """What data parallelism needs from a process group."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """The elementwise sum of ``tensor`` over all ranks (every rank gets it)."""


class _Active(threading.local):
    """The collectives entered by this thread (a stack)."""

    def __init__(self):
        self.stack: list[Collective] = []


_ACTIVE = _Active()


@contextmanager
def data_parallel(collective: Collective | None) -> Iterator[Collective | None]:
    """Run the block data-parallel over ``collective`` (``None``: single process)."""
    if collective is None or collective.world_size <= 1:
        yield collective
        return
    _ACTIVE.stack.append(collective)
    try:
        yield collective
    finally:
        _ACTIVE.stack.pop()


def current_collective() -> Collective | None:
    """The active collective, or ``None`` in a single process."""
    return _ACTIVE.stack[-1] if _ACTIVE.stack else None


def reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over ranks (the tensor itself in a single process).

    The result has no autograd graph: use it for values (moments, potentials), never for
    a loss to backpropagate.
    """
    collective = current_collective()
    if collective is None:
        return tensor
    return collective.all_reduce(tensor.detach().clone())


def global_mean(tensor: Tensor) -> Tensor:
    """Mean of every element of ``tensor`` on every rank (``tensor.mean()`` in a single
    process): the union batch's mean, whatever the shard sizes."""
    if current_collective() is None:
        return tensor.mean()
    total = reduce_sum(torch.stack([tensor.sum(), torch.full_like(tensor.sum(), tensor.numel())]))
    return total[0] / total[1]


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (shards may differ
    in length; ``tensor`` itself in a single process).

    Two sum-reductions: the lengths, then a zero-padded ``(world_size, max_len, ...)``
    buffer in which each rank fills its own slot.
    """
    collective = current_collective()
    if collective is None:
        return tensor
    world, rank = collective.world_size, collective.rank
    lengths = torch.zeros(world, device=tensor.device)
    lengths[rank] = tensor.shape[0]
    lengths = [int(n) for n in collective.all_reduce(lengths).tolist()]
    dtype = tensor.dtype if tensor.is_floating_point() else torch.float64
    buffer = tensor.new_zeros((world, max(lengths), *tensor.shape[1:]), dtype=dtype)
    buffer[rank, : tensor.shape[0]] = tensor.to(dtype)
    buffer = collective.all_reduce(buffer)
    return torch.cat([buffer[r, :n] for r, n in enumerate(lengths)]).to(tensor.dtype)


def reduce_potential(potential: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """The ``reduce_fn`` hook of the Langevin kernels (:mod:`pyro_lvm.infer.mcmc`):
    potential and gradient summed over ranks in one collective inside
    :func:`data_parallel`, unchanged outside it."""
    if current_collective() is None:
        return potential, grad
    total = reduce_sum(torch.cat([potential.reshape(-1), grad.reshape(-1)]))
    n = potential.numel()
    return total[:n].view_as(potential), total[n:].view_as(grad)


def all_reduce_gradients(params: Sequence[Tensor], *values: Tensor) -> tuple[Tensor, ...]:
    r"""Sum the gradients of ``params`` and the scalars ``values`` over ranks, in place.

    One collective: the gradients (zeros where a rank has none), one has-gradient flag per
    parameter and the values are packed into one flat buffer. A parameter keeps
    ``grad = None`` only when no rank produced a gradient for it, so every rank's
    optimizer sees the same set of gradients. ``params`` must be listed in the same order
    on every rank. Returns the summed ``values`` (the inputs in a single process).
    """
    collective = current_collective()
    if collective is None or not (params or values):
        return values
    ref = params[0] if params else values[0]
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    like = dict(device=ref.device, dtype=dtype)
    grads = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(**like)
        for p in params
    ]
    flags = torch.tensor([p.grad is not None for p in params], **like)
    scalars = [v.detach().reshape(1).to(**like) for v in values]
    flat = collective.all_reduce(torch.cat([*grads, flags, *scalars]))
    sizes = [p.numel() for p in params]
    *summed, flags, totals = flat.split([*sizes, len(params), len(values)])
    for p, grad, has_grad in zip(params, summed, flags.tolist()):
        p.grad = grad.view_as(p).to(p.dtype) if has_grad > 0 else None
    return tuple(t.to(v.dtype) for t, v in zip(totals, values))


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` rows
    (``torch.tensor_split`` sizes: the first ``n % world_size`` ranks get one row more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def rank_seed(seed: int, step: int, rank: int) -> int:
    """A seed for rank ``rank``'s own random draws at ``step``: independent streams across
    ranks and steps, recomputable on resume (nothing to checkpoint)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
