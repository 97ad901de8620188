r"""Is the chain moving? Cheap mixing summaries and the one-line warnings they trigger.

A chain can be exact and useless: a step size adapted to the stiffest direction of the
potential leaves the other directions nearly still, and its draws are thousands of copies
of the start. The kernels report it rather than let a user average such draws:

* **effective sample size per draw** of a few tracked latent coordinates (chosen once,
  with a fixed generator, so tracking draws no random numbers), by Geyer's initial
  monotone sequence (:func:`pyro.ops.stats.effective_sample_size`);
* **relative move**: the root-mean-square change of the latents per transition over their
  spread across datapoints, :math:`\lVert z_{t+1} - z_t\rVert_{rms} / \lVert z_t -
  \bar z_t\rVert_{rms}`;
* **step-size collapse**: the adapted step size relative to its first value.
"""

from __future__ import annotations

import math

import torch
from pyro.ops.stats import effective_sample_size
from torch import Tensor

__all__ = [
    "MixingWarning",
    "MIN_ESS_PER_DRAW",
    "MIN_RELATIVE_MOVE",
    "MAX_STEP_SIZE_FALL",
    "tracked_coordinates",
    "ess_per_draw",
    "move_and_spread",
    "relative_move",
    "mixing_problems",
]

#: fewer effective draws than this fraction of the draws: the chain barely mixes
MIN_ESS_PER_DRAW = 0.005
#: latents moving less than this fraction of their spread per transition: frozen
MIN_RELATIVE_MOVE = 1e-3
#: a step size that fell by more than this factor from its first value has collapsed
MAX_STEP_SIZE_FALL = 1e3
#: draws below which an ESS estimate means little (no warning then)
MIN_DRAWS = 100


class MixingWarning(UserWarning):
    """The chain barely moves: its draws are not a usable posterior sample."""


def tracked_coordinates(size: int, count: int = 16, where: Tensor | None = None) -> Tensor:
    """``count`` fixed indices into a flat latent vector of ``size`` entries, among those
    where ``where`` (a boolean vector of ``size``; empty or ``None``: all) is true; a
    private generator leaves the caller's random stream untouched."""
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(size, generator=gen)
    if where is not None and where.numel() == size:
        order = order[where.cpu()[order]]
    return order[: min(count, order.numel())]


def ess_per_draw(draws: Tensor) -> float:
    """The smallest effective sample size per draw over the columns of ``draws`` (S, k)."""
    ess = effective_sample_size(draws.double().unsqueeze(0), chain_dim=0, sample_dim=1)
    ess = ess[torch.isfinite(ess)]
    return float(ess.min()) / draws.shape[0] if ess.numel() else math.nan


def move_and_spread(
    before: dict[str, Tensor], after: dict[str, Tensor], free: dict[str, Tensor] | None = None
) -> Tensor:
    """``[mean squared move, mean squared spread]`` of the latents between two states, as
    one tensor (no host sync: read many at once), over the coordinates ``free`` marks
    (site -> boolean mask shaped like the value; default all)."""
    move = spread = count = 0.0
    for name, value in after.items():
        keep = 1.0 if free is None else free[name].to(value.dtype)
        move = move + ((value - before[name]).square() * keep).sum()
        spread = spread + ((value - value.mean(0)).square() * keep).sum()
        count = count + (value.numel() if free is None else keep.sum())
    return torch.stack([move, spread]) / max(count, 1)


def relative_move(
    before: dict[str, Tensor], after: dict[str, Tensor], free: dict[str, Tensor] | None = None
) -> tuple[float, float]:
    """``(rms move, rms spread)`` of the latents between two states (summed over sites,
    over the coordinates ``free`` marks)."""
    move, spread = move_and_spread(before, after, free).tolist()
    return math.sqrt(move), math.sqrt(spread)


def mixing_problems(
    *,
    num_draws: int = 0,
    min_ess_per_draw: float = math.nan,
    move_ratio: float = math.nan,
    first_step_size: float | None = None,
    step_size: float | None = None,
) -> list[str]:
    """One-line descriptions (with the fix) of what the summaries show; empty if fine."""
    problems = []
    if num_draws >= MIN_DRAWS and min_ess_per_draw < MIN_ESS_PER_DRAW:
        problems.append(
            f"the chain barely mixes: min ESS {min_ess_per_draw * num_draws:.3g} of "
            f"{num_draws} draws over tracked latent coordinates; precondition the chain "
            "(precondition=1e-6, the default), use fewer rows per run, or draw more"
        )
    if move_ratio < MIN_RELATIVE_MOVE:
        problems.append(
            f"the chain is frozen: the latents move {move_ratio:.2g} of their spread per "
            "transition; precondition the chain (precondition=1e-6, the default) or check "
            "the step size"
        )
    if first_step_size and step_size and step_size < first_step_size / MAX_STEP_SIZE_FALL:
        problems.append(
            f"the step size collapsed from {first_step_size:.2g} to {step_size:.2g}; "
            "precondition the chain (precondition=1e-6, the default) or lower the learning "
            "rate"
        )
    return problems
