"""What a model object must provide to be trained, evaluated, checkpointed, sampled and
plotted by the experiment layer (the trainer, :func:`~pyro_lvm.experiments.evaluation.evaluate`,
the figures, ``pyro-lvm train custom`` and :func:`pyro_lvm.load_run`).

The ready models (:class:`~pyro_lvm.models.VAE`, :class:`~pyro_lvm.models.VAEFlow`,
:class:`~pyro_lvm.models.LangevinAutoencoder`, :class:`~pyro_lvm.models.SigmoidBeliefNet`,
:class:`~pyro_lvm.models.AEGMM`, :class:`~pyro_lvm.models.PPCA`) implement all three
protocols; a researcher's own model needs only :class:`TrainableModel` to train, and
gains ``pyro-lvm sample`` and the figures by adding the others. The checks are
structural (:func:`typing.runtime_checkable`): no base class is required.

- :class:`TrainableModel`: the trainer (SVI on ``model``/``guide``), the evaluator (the
  guide as importance proposal) and checkpoints (``state_dict``);
- :class:`GenerativeModel`: ``pyro-lvm sample`` and ``load_run(...).model.generate``;
- :class:`PlottableModel`: the figures (samples, reconstructions, latent scatter).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["TrainableModel", "GenerativeModel", "PlottableModel", "members", "missing"]


@runtime_checkable
class TrainableModel(Protocol):
    """Pyro programs over a data plate of the rows of ``x``, and module state.

    ``model(x)`` observes ``x`` (shape ``(N, D)``) inside ``pyro.plate(..., N)``;
    ``guide(x)`` samples every latent site of ``model`` (it is also the proposal of the
    importance-weighted evaluator). Optional: ``check_data(x)`` (one-line errors for data
    the likelihood cannot take), ``max_plate_nesting`` (default 1).
    """

    def model(self, x: torch.Tensor) -> Any: ...

    def guide(self, x: torch.Tensor) -> Any: ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def state_dict(self, *args, **kwargs) -> dict: ...


@runtime_checkable
class GenerativeModel(Protocol):
    """``generate(n)``: ``n`` draws summarising :math:`p(x)` (the ready models return
    decoder means at prior draws), shape ``(n, D)``."""

    def generate(self, num: int) -> torch.Tensor: ...


@runtime_checkable
class PlottableModel(Protocol):
    """A decoder and a likelihood (``likelihood(decoder(z))`` is :math:`p(x \\mid z)`,
    ``likelihood.mean`` and ``likelihood.data_range`` place images on a scale), an
    ``encode(x)`` point summary of :math:`q(z \\mid x)` and ``reconstruct(x)``; with a
    ``prior(n)`` distribution the samples figure shows draws beside means."""

    decoder: Any
    likelihood: Any

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor: ...


def members(protocol: type) -> list[str]:
    """The method and attribute names a protocol requires."""
    names = {n for n in vars(protocol) if not n.startswith("_")}
    names |= set(getattr(protocol, "__annotations__", {}))
    return sorted(names)


def missing(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (empty when it conforms)."""
    return [n for n in members(protocol) if not hasattr(obj, n)]
