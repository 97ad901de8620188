r"""Training that is finite but hopeless: the checks the trainer runs after every epoch.

A diverging loss raises :class:`~pyro_lvm.infer.diagnostics.DivergenceError`; these checks
catch what stays finite and is still useless, and report it as a warning (and under the
``warnings`` key of ``metrics.json``) instead of a silent exit 0:

``loss_exploded``
    The epoch's mean loss per datapoint exceeds the loss of the very first step (the
    untrained model) by more than ``LOSS_GROWTH`` times its magnitude:
    :math:`\bar L_e - L_0 > \text{LOSS\_GROWTH} \cdot \max(|L_0|, 1)`. Training should
    lower the loss; this is an order-of-magnitude increase (e.g. ``--lr 10``).
``step_size_collapsed``
    A Langevin step size fell below ``STEP_SIZE_FLOOR``, or by more than
    :data:`~pyro_lvm.infer.mcmc.mixing.MAX_STEP_SIZE_FALL` times from its first value
    while the latents' RMS move per transition (``move``) fell with it, by more than
    :math:`\sqrt{\text{MAX\_STEP\_SIZE\_FALL}}` times its first value: the chain no
    longer moves, so the "posterior samples" are the encoder's outputs. (The step size
    is in the chain's coordinates, the weights: features that grow during training
    lower it while the latents move as before, which is no collapse.)
``chain_frozen``
    The latents move less than :data:`~pyro_lvm.infer.mcmc.mixing.MIN_RELATIVE_MOVE` of
    their spread per transition (``move_ratio``, averaged over the latest transitions).
``no_acceptance``
    The Metropolis acceptance rate averaged over an epoch is below ``MIN_ACCEPT_RATE``
    (e.g. ``--no-adapt-step-size`` with too large a ``--step-size``): every proposal was rejected.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from pyro_lvm.infer.mcmc.mixing import MAX_STEP_SIZE_FALL, MIN_RELATIVE_MOVE

__all__ = ["LOSS_GROWTH", "MIN_ACCEPT_RATE", "STEP_SIZE_FLOOR", "HealthIssue", "check_epoch"]

LOSS_GROWTH = 10.0
STEP_SIZE_FLOOR = 1e-8
MIN_ACCEPT_RATE = 1e-3


class HealthIssue(NamedTuple):
    """One finding: a stable ``kind`` (the metrics flag) and a one-line message."""

    kind: str
    message: str


def check_epoch(
    record: dict,
    first_loss: float | None,
    first_step_size: float | None = None,
    first_move: float | None = None,
) -> list[HealthIssue]:
    """The issues visible in one epoch record (``train_loss``, ``step_size``, ``move``,
    ``accept_rate``, ``move_ratio``; absent keys are skipped), given the first step's
    loss, step size and latent move."""
    issues = []
    epoch, loss = record.get("epoch"), record.get("train_loss")
    if first_loss is not None and loss is not None and math.isfinite(first_loss):
        if loss - first_loss > LOSS_GROWTH * max(abs(first_loss), 1.0):
            issues.append(
                HealthIssue(
                    "loss_exploded",
                    f"epoch {epoch}: loss {loss:.3g} per datapoint is over {LOSS_GROWTH:g}x "
                    f"the untrained model's {first_loss:.3g}; lower the learning rate (--lr)",
                )
            )
    step = record.get("step_size")
    fell = first_step_size is not None and step is not None
    fell = fell and first_step_size > 0 and step < first_step_size / MAX_STEP_SIZE_FALL
    move = record.get("move")
    moving = move is not None and first_move is not None and math.isfinite(move)
    moving = moving and first_move > 0 and move >= first_move / math.sqrt(MAX_STEP_SIZE_FALL)
    finite = step is not None and math.isfinite(step)
    if finite and (step < STEP_SIZE_FLOOR or (fell and not moving)):
        since = f" (from {first_step_size:.2g} at the first step)" if fell else ""
        issues.append(
            HealthIssue(
                "step_size_collapsed",
                f"epoch {epoch}: Langevin step size {step:.2g}{since}: the chain is frozen; "
                "keep the Jacobian correction and centred features (the defaults), lower --lr "
                "or set --step-size",
            )
        )
    ratio = record.get("move_ratio")
    if ratio is not None and math.isfinite(ratio) and ratio < MIN_RELATIVE_MOVE:
        issues.append(
            HealthIssue(
                "chain_frozen",
                f"epoch {epoch}: the latents move {ratio:.2g} of their spread per Langevin "
                "transition: the chain is frozen; keep the Jacobian correction and centred "
                "features (the defaults) or set --step-size",
            )
        )
    accept = record.get("accept_rate")
    if accept is not None and math.isfinite(accept) and accept < MIN_ACCEPT_RATE:
        issues.append(
            HealthIssue(
                "no_acceptance",
                f"epoch {epoch}: acceptance rate {accept:.2g}: every Langevin proposal was "
                "rejected; lower --step-size or drop --no-adapt-step-size",
            )
        )
    return issues
