r"""Checks that a bound batch's potential is one ALD can sample.

Metropolis-Hastings needs :math:`V` to be a *function* of the state: dropout, batch norm in
training mode or random numbers inside the model or encoder make two evaluations at the
same state differ, and the chain then samples no fixed law (:func:`check_potential`
refuses it in one line, naming the layers it finds). A latent coordinate that no prior or
likelihood term reaches (masked padding) has a flat potential and random-walks freely
(:func:`check_flat` warns).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyro_lvm.infer import sites as S
from pyro_lvm.infer.mcmc.ald import ALDBatch
from pyro_lvm.infer.mcmc.langevin import LangevinState

__all__ = ["FlatPotentialWarning", "check_flat", "check_potential", "stochastic_modules"]


class FlatPotentialWarning(UserWarning):
    """Latent coordinates that no prior or likelihood term reaches (e.g. masked padding)."""


def stochastic_modules(*modules: object) -> list[str]:
    """Dropout and batch-norm layers in training mode among the given modules (their
    qualified names): what makes a network's output change between identical calls."""
    found = []
    for root in modules:
        if not isinstance(root, nn.Module):
            continue
        for name, m in root.named_modules():
            kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
            if m.training and isinstance(m, kinds):
                found.append(f"{name or type(root).__name__} ({type(m).__name__})")
    return found


@torch.no_grad()
def check_potential(
    batch: ALDBatch, langevin: LangevinState, suspects: Sequence[object] = ()
) -> None:
    """Refuse in one line a potential that is not a function of the state: evaluated
    again at the state, it must give the same value (dropout, batch norm in training
    mode or random numbers inside the model or encoder break MCMC's detailed balance)."""
    # both evaluations local: under data parallelism the state holds the global value
    first = batch.potential_fn(langevin.position).sum()
    again = batch.potential_fn(langevin.position).sum()
    tol = 1e-5 * (1.0 + float(first.abs()))
    if math.isfinite(float(first)) and not float((again - first).abs()) <= tol:
        modules = stochastic_modules(*suspects)
        cause = (
            f"layers in training mode: {', '.join(modules)}; call .eval() on them"
            if modules
            else "random numbers drawn inside the model or encoder; make them deterministic "
            "given the latents"
        )
        raise ValueError(
            f"the potential changes between two evaluations at the same state ({float(first):.6g}"
            f", then {float(again):.6g}), so MCMC would sample no fixed law; cause: {cause}"
        )


def flat_coordinates(batch: ALDBatch, langevin: LangevinState) -> dict[str, Tensor]:
    """Per local latent site, a boolean mask (of the site's unconstrained value) of the
    coordinates with an exactly zero gradient of the potential at a random point near
    the state: no prior or likelihood term reaches them (masked padding), so the chain
    moves them as a free random walk. One gradient evaluation; draws none of the
    caller's random numbers."""
    gen = torch.Generator().manual_seed(0)
    u = {}
    for name, value in _local_at(batch, langevin).items():
        offset = torch.randn(value.shape, generator=gen).to(value) * (0.1 + value.abs())
        u[name] = (value + offset).requires_grad_()
    globals_ = S.global_values(batch.sites, langevin.position[batch.chain_size :].detach())
    with torch.enable_grad():
        # the potential as a function of the site values themselves
        potential = batch.potential_of({**u, **globals_}, batch.args, batch.kwargs)
        grads = torch.autograd.grad(potential.sum(), list(u.values()), allow_unused=True)
    return {
        name: torch.ones_like(value, dtype=torch.bool) if grad is None else grad == 0
        for (name, value), grad in zip(u.items(), grads)
    }


def check_flat(batch: ALDBatch, langevin: LangevinState) -> None:
    """Warn (one line per site) about flat local latent coordinates
    (:func:`flat_coordinates`)."""
    for name, mask in flat_coordinates(batch, langevin).items():
        flat = int(mask.sum())
        if flat:
            warnings.warn(
                f"{flat} of {mask.numel()} coordinates of latent site {name!r} have a flat "
                "potential (no prior or likelihood term reaches them, e.g. masked padding): "
                "ALD moves them as a free random walk; drop them from the site or keep the "
                "prior term unmasked",
                FlatPotentialWarning,
                stacklevel=4,
            )


def _local_at(batch: ALDBatch, langevin: LangevinState) -> dict[str, Tensor]:
    with torch.no_grad():
        return batch.chain.local_values(langevin.position[: batch.chain_size])
