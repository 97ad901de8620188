r"""Per-datapoint feature centring with running statistics (for amortized Langevin).

Amortized Langevin dynamics moves the latents :math:`z_i = \Phi g(x_i) + b` of a batch
with the latent-space preconditioner :math:`G G^\top` (rows :math:`g(x_i)^\top`). ReLU
features are non-negative, so trained trunks put most of every feature vector into one
direction shared by all datapoints: :math:`G G^\top` then has one huge eigenvalue (all
latents moving together), the MALA step size adapts to it and the per-datapoint
directions barely move.

:class:`FeatureCentering` removes that common mode at its source:

.. math::

    \tilde g(x) = \bigl(g(x) - m\bigr) / s,

with :math:`m` (and optionally the per-feature scale :math:`s`) an exponential moving
average of the training batches' feature statistics, stored as buffers. The output for
:math:`x_i` uses the statistics *before* the current batch's update, so each
:math:`z_i` is a function of :math:`x_i` alone (unlike batch normalization), as ALD's
rank argument needs. The function class of the encoder is unchanged
(:math:`\Phi(g - m) + b = \Phi g + (b - \Phi m)`); only the geometry of the chain on
:math:`\Phi` changes: :math:`G G^\top` becomes the (scaled) Gram matrix of centred
features.

The statistics are initialised from the first training batch (data-dependent
initialisation), updated in training mode only, and frozen in ``eval()`` mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FeatureCentering"]


class FeatureCentering(nn.Module):
    """``h -> (h - running_mean) [/ sqrt(running_var + eps)]``, statistics from past batches.

    Parameters
    ----------
    num_features : int
        Feature width.
    momentum : float
        Weight of the newest batch in the moving averages, in (0, 1].
    standardize : bool
        Also divide by the running per-feature standard deviation.
    eps : float
        Added to the variance before the square root.
    """

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.05,
        standardize: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.num_features, self.momentum = num_features, momentum
        self.standardize, self.eps = standardize, eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, h: Tensor) -> Tensor:
        if self.training and h.dim() >= 2 and h.shape[0] > 1:
            flat = h.detach().reshape(-1, self.num_features)
            mean, var = flat.mean(0), flat.var(0)
            if int(self.num_batches_tracked) == 0:  # data-dependent initialisation
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
                out = self._apply_stats(h)
            else:  # this batch's rows use past statistics only: z_i depends on x_i alone
                out = self._apply_stats(h)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
            self.num_batches_tracked += 1
            return out
        return self._apply_stats(h)

    def _apply_stats(self, h: Tensor) -> Tensor:
        out = h - self.running_mean
        if self.standardize:
            out = out * torch.rsqrt(self.running_var + self.eps)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, standardize={self.standardize}"
