"""Which tensors the running pyro_lvm driver already trains, so that the ready models
may skip re-registering them with Pyro's param store on every call.

The ready models call :meth:`~pyro_lvm.models.base.LatentVariableModel.register` (the
equivalent of :func:`pyro.module`) at the start of ``model`` and ``guide`` so that plain
:class:`pyro.infer.SVI` finds their parameters. That costs one trip through Pyro's effect
handler stack per parameter per call (one ``pyro.param`` message per tensor), a visible
share of a small model's step (``docs/benchmarks.md``). Under a pyro_lvm driver whose
torch optimizer already holds every one of the module's parameters, the registration
changes nothing (the optimizer steps them either way), so the driver declares the tensors
it holds here and the module skips it. Outside such a driver (plain Pyro, a
``PyroOptim``) nothing is declared and every call registers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_HELD: ContextVar[frozenset[int]] = ContextVar("pyro_lvm_held_params", default=frozenset())


@contextmanager
def holding(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Declare that the enclosing driver trains (or deliberately leaves alone) ``tensors``."""
    token = _HELD.set(frozenset(id(t) for t in tensors))
    try:
        yield
    finally:
        _HELD.reset(token)


def all_held(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether the running driver declared every one of ``tensors`` (False outside one)."""
    held = _HELD.get()
    return bool(held) and all(id(t) in held for t in tensors)
