"""Learning-rate schedules for any inference driver: torch's schedulers on the torch
optimizers the driver holds, stepped once per epoch by the trainer."""

from __future__ import annotations

import pyro.optim
import torch

__all__ = ["find_optimizers", "make_schedulers", "set_learning_rate"]


def find_optimizers(inference) -> list[torch.optim.Optimizer]:
    """The torch optimizers an inference driver holds: its ``optim`` attribute (torch,
    or the per-parameter optimizers of a :class:`pyro.optim.PyroOptim`) and any other
    attribute that is one."""
    found, seen = [], set()
    for value in (getattr(inference, "optim", None), *vars(inference).values()):
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.optim.Optimizer):
            found.append(value)
        elif isinstance(value, pyro.optim.PyroOptim):
            found.extend(value.optim_objs.values())
    return found


def set_learning_rate(inference, lr: float) -> int:
    """Set ``lr`` in every optimizer the driver holds (a resumed run's new ``--lr``);
    returns how many optimizers were changed."""
    optim = getattr(inference, "optim", None)
    if isinstance(optim, pyro.optim.PyroOptim) and isinstance(optim.pt_optim_args, dict):
        optim.pt_optim_args["lr"] = lr  # optimizers created later start at the new rate
    optimizers = find_optimizers(inference)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    return len(optimizers)


def make_schedulers(inference, schedule: str, epochs: int, step: int, gamma: float) -> list:
    r"""Per-epoch schedulers for every optimizer of ``inference``.

    ``cosine``: :math:`\eta_e = \eta_0 (1 + \cos(\pi e / E)) / 2` to zero at ``epochs``
    (:class:`torch.optim.lr_scheduler.CosineAnnealingLR`); ``step``: multiply by ``gamma``
    every ``step`` epochs (:class:`~torch.optim.lr_scheduler.StepLR`); ``none``: no
    schedulers. Raises a one-line ``ValueError`` when a schedule is asked of a driver
    without a torch optimizer.
    """
    if schedule == "none":
        return []
    optimizers = find_optimizers(inference)
    if not optimizers:
        raise ValueError(
            f"--lr-schedule {schedule} needs a torch optimizer, and this model's inference has "
            "none (a closed-form fit, or a Pyro optimizer not yet stepped)"
        )
    if schedule == "cosine":
        return [
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(epochs, 1)) for o in optimizers
        ]
    if schedule == "step":
        return [
            torch.optim.lr_scheduler.StepLR(o, step_size=step, gamma=gamma) for o in optimizers
        ]
    raise ValueError(f"--lr-schedule must be none, cosine or step, got {schedule!r}")
