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

**Updates never change the encoder's function** once the chain layer is attached with
:meth:`FeatureCentering.compensate`: every later update of :math:`m` (and :math:`s`) is
absorbed into that layer,

.. math::

    b \leftarrow b + \Phi\,\mathrm{diag}(s)^{-1}(m' - m), \qquad
    \Phi \leftarrow \Phi\,\mathrm{diag}(s'/s),

so :math:`z = \Phi (g - m)/s + b` is the same function of :math:`x` before and after;
only the chain's geometry follows the new statistics. Without it the running mean *undoes*
the trunk's own training with a lag: when the optimizer moves the features' mean to move
the latents, the mean catches up a few dozen batches later and moves every latent back,
the optimizer pushes again, and the features run away (the measurements are in
``docs/langevin.md``, "A stable default").

The chain's geometry is the centring's only business: the correction of the trunk's
gradient for the Jacobian of :math:`\Phi \mapsto z` is the trainer's
(:class:`~pyro_lvm.infer.LAE`, ``jacobian=True``; :mod:`pyro_lvm.infer.trunk_jacobian`),
and applies to any encoder whose chain is an ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_lvm.collective import current_collective, reduce_sum

__all__ = ["FeatureCentering"]


def _batch_moments(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and unbiased variance of the rows; data parallel, of the union of
    every rank's rows (sums of the rows and of their squares, one collective), so the
    running statistics stay identical on every rank."""
    if current_collective() is None:
        return flat.mean(0), flat.var(0)
    n = torch.full_like(flat[0], flat.shape[0])
    total = reduce_sum(torch.stack([n, flat.sum(0), flat.pow(2).sum(0)]))
    n, s, q = total
    mean = s / n
    return mean, (q - n * mean**2) / (n - 1)


class FeatureCentering(nn.Module):
    """``h -> (h - running_mean) [/ sqrt(running_var + eps)]``, statistics from past batches.

    Parameters
    ----------
    num_features : int
        Feature width.
    momentum : float
        Weight of the newest batch in the moving averages, in (0, 1]. With the updates
        absorbed (:meth:`compensate`) the statistics shape only the chain's geometry, so
        they should follow the trunk closely: 0.5 (about the last 3 batches) tracks it
        without a lag, 0.05 (the former default, about 40 batches) let the features run
        away in one of 3 seeds even with the updates absorbed.
    standardize : bool
        Also divide by the running per-feature standard deviation.
    eps : float
        Added to the variance before the square root.
    """

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.5,
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
        # the statistics after the latest batch, applied at the next training batch
        self.register_buffer("pending_mean", torch.zeros(num_features))
        self.register_buffer("pending_var", torch.ones(num_features))
        # the chain layer absorbing updates (a list: not a registered submodule)
        self._heads: list[nn.Linear] = []

    def compensate(self, head: nn.Linear) -> FeatureCentering:
        """Absorb every later statistics update into ``head`` (the ``nn.Linear`` right
        after this layer), so updates keep the encoder's function (module docstring)."""
        if not isinstance(head, nn.Linear) or head.in_features != self.num_features:
            raise ValueError(
                f"compensate needs the nn.Linear with {self.num_features} inputs that follows "
                f"this layer, got {head!r}"
            )
        if head.bias is None:
            raise ValueError("compensate needs a chain layer with a bias (nn.Linear(bias=True))")
        self._heads = [head]
        return self

    def forward(self, h: Tensor) -> Tensor:
        if self.training and h.dim() >= 2 and h.shape[0] > 1:
            mean, var = _batch_moments(h.detach().reshape(-1, self.num_features))
            if int(self.num_batches_tracked) == 0:  # data-dependent initialisation
                for buf in (self.running_mean, self.pending_mean):
                    buf.copy_(mean)
                for buf in (self.running_var, self.pending_var):
                    buf.copy_(var)
                out = self._apply_stats(h)
            else:  # this batch's rows use past statistics only: z_i depends on x_i alone
                self._apply_pending()
                out = self._apply_stats(h)
                self.pending_mean.copy_(self.running_mean.lerp(mean, self.momentum))
                self.pending_var.copy_(self.running_var.lerp(var, self.momentum))
            self.num_batches_tracked += 1
            return out
        return self._apply_stats(h)

    def _inv_scale(self) -> Tensor:
        """:math:`1/s` per feature (ones unless ``standardize``)."""
        if self.standardize:
            return torch.rsqrt(self.running_var + self.eps)
        return torch.ones_like(self.running_mean)

    @torch.no_grad()
    def _apply_pending(self) -> None:
        """Make the previous batch's update current, absorbed into the chain layer: it
        takes effect now, together with the compensation, never half-way through a batch
        whose features were computed with the old statistics."""
        old_mean, old_inv = self.running_mean.clone(), self._inv_scale()
        self.running_mean.copy_(self.pending_mean)
        self.running_var.copy_(self.pending_var)
        for head in self._heads:
            head.bias.add_(head.weight @ ((self.running_mean - old_mean) * old_inv))
            if self.standardize:
                head.weight.mul_(old_inv / self._inv_scale())

    def _apply_stats(self, h: Tensor) -> Tensor:
        out = h - self.running_mean
        return out * self._inv_scale() if self.standardize else out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the pending statistics: nothing pending
        for name in ("mean", "var"):
            state_dict.setdefault(
                f"{prefix}pending_{name}", state_dict.get(f"{prefix}running_{name}")
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, standardize={self.standardize}"
