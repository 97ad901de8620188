r"""The Jacobian correction of the encoder trunk's gradient in LAE training.

LAE trains the trunk on the potential at the chain's states, i.e. (on average over the
chain's stationary law :math:`\pi(\Phi) \propto e^{-V(\Phi)}`) on :math:`-\log Z` with
:math:`Z = \int e^{-V(\Phi)}\,d\Phi`. The chain layer maps its weight to the latents,
:math:`z_i = \Phi g_i + b`: per latent column a linear map of the rows :math:`G` (the
layer's input for the batch) with volume factor :math:`\det(G G^\top)^{1/2}` when the
rank condition holds. Changing variables :math:`\Phi \mapsto z` gives

.. math::

    -\log Z = -\log p(x_{1:n}) + \tfrac{k}{2} \log\det(G G^\top) + \text{const}

for :math:`k` latent columns, so besides the evidence the trunk descends
:math:`\tfrac{k}{2}\log\det(G G^\top)`: it shrinks the features and collapses their
smallest directions first (the gradient is :math:`k (G G^\top)^{-1} G`), and the chain
weight grows to keep :math:`z` in place. With the decoder trained at the same time the
chain's latents then act as point estimates, the model's prior scales shrink around them,
the potential stiffens and the step size collapses: Langevin training silently becomes
MAP (measured on Pyro's deep Markov model and on the LAE paper's digits protocol, see
``docs/langevin.md``, "The trunk descends a log-determinant").

The correction adds the gradient of
:math:`-\tfrac{k}{2}\log\det(G G^\top + \epsilon I)` (``jitter`` :math:`\epsilon`
relative to the mean squared norm of a row) to the trunk's, which cancels that term; the
potential, the chain and the reported loss are unchanged. It factors the smaller of
:math:`G G^\top` and :math:`G^\top G` (the same gradient, by the push-through identity);
data parallel it factors :math:`G^\top G`, a sum over rows, so that it is the union
batch's (one collective).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pyro_lvm.collective import current_collective, reduce_sum

__all__ = ["log_det_gradient", "jacobian_term"]

#: relative damping of the Gram matrix (times its mean diagonal)
JITTER = 1e-6


def _factor(rows: Tensor, jitter: float) -> tuple[Tensor, bool]:
    r"""The Cholesky factor of :math:`G G^\top + \epsilon I` (``by_rows``: fewer rows than
    features, one process) or of :math:`G^\top G + \epsilon I` (a sum over rows, so data
    parallel it is summed over every rank's rows), in float64."""
    rows = rows.detach().double()
    n, width = rows.shape
    if current_collective() is None and n < width:
        gram = rows @ rows.T
        eps = jitter * gram.diagonal().sum().clamp_min(1e-30) / n
        eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
        return torch.linalg.cholesky(gram + eps * eye), True
    total = reduce_sum(torch.cat([rows.T @ rows, rows.new_tensor([[n]]).expand(-1, width)]))
    gram, count = total[:-1], total[-1, 0]
    eps = jitter * gram.diagonal().sum().clamp_min(1e-30) / count
    eye = torch.eye(width, dtype=gram.dtype, device=gram.device)
    return torch.linalg.cholesky(gram + eps * eye), False


@torch.no_grad()
def log_det_gradient(rows: Tensor, coef: float, jitter: float = JITTER) -> Tensor:
    r"""The gradient of :math:`-c \log\det(G G^\top + \epsilon I)` with respect to the rows
    of :math:`G` (``rows``, ``(n, d)``): :math:`-2c\,(G G^\top + \epsilon I)^{-1} G`,
    without a graph."""
    factor, by_rows = _factor(rows, jitter)
    flat = rows.detach().to(factor.dtype)
    if by_rows:
        solved = torch.cholesky_solve(flat, factor)
    else:  # G (G^T G + eps I)^{-1}, equal by the push-through identity
        solved = torch.cholesky_solve(flat.T, factor).T
    return ((-2.0 * coef) * solved).to(rows.dtype)


def jacobian_term(features: Sequence[Tensor], columns: Sequence[int]) -> Tensor | float:
    r"""A zero-valued term whose gradient is the correction, summed over chain layers:
    :math:`-\tfrac{k_h}{2}\nabla\log\det(G_h G_h^\top + \epsilon I)` for the input rows
    :math:`G_h` of layer :math:`h` with :math:`k_h` latent columns. Inputs without a graph
    (no trunk before the layer) contribute nothing."""
    term = 0.0
    for g, k in zip(features, columns):
        if not g.requires_grad:
            continue
        rows = g.reshape(-1, g.shape[-1])
        term = term + (rows * log_det_gradient(rows, 0.5 * k)).sum()
    return term - term.detach() if torch.is_tensor(term) else term
