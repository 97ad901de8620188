r"""Training driver for deterministic autoencoders with a post-hoc prior.

An autoencoder has no guide and no ELBO: it minimises the reconstruction loss, the
negative log-likelihood of each datapoint at its own code,

.. math::

    \mathcal L = -\sum_{i \in \text{batch}} \log p_\theta\big(x_i \mid z = e_\phi(x_i)\big),

with a plain :mod:`torch.optim` optimizer. Its prior (e.g. a Gaussian mixture on the codes,
:class:`pyro_lvm.models.AEGMM`) is fitted once *after* training, on the whole training
set, by :meth:`AutoencoderFit.finalize`: the trainer calls

1. ``inference.step(x)`` for every minibatch, as for any inference algorithm;
2. ``inference.finalize(train_x)`` once training has finished and before evaluation or
   sampling (and again after further training, since the codes have moved), then saves
   a checkpoint: the fitted prior lives in the model's buffers, so only a checkpoint
   written after ``finalize`` carries it to later evaluation and sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_lvm.infer.driver import OptimizerDriver

__all__ = ["AutoencoderFit"]


class AutoencoderFit(OptimizerDriver):
    """SVI-like driver: reconstruction-loss steps, then a one-off :meth:`finalize`.

    Parameters
    ----------
    reconstruction_log_prob : callable
        ``f(x) -> (B,)``: :math:`\\log p_\\theta(x_i \\mid e_\\phi(x_i))` per datapoint
        (e.g. :meth:`pyro_lvm.models.AEGMM.reconstruction_log_prob`).
    optim : torch.optim.Optimizer
        Optimizer over the encoder, decoder and likelihood parameters.
    finalize : callable, optional
        ``finalize(train_x) -> dict[str, float]``: the post-training fit (e.g.
        :meth:`pyro_lvm.models.AEGMM.finalize`); its diagnostics join :meth:`metrics`.
    clip_norm : float, optional
        Clip the global gradient norm before each step.
    """

    loss_name = "reconstruction loss"

    def __init__(
        self,
        reconstruction_log_prob: Callable[[torch.Tensor], torch.Tensor],
        optim: torch.optim.Optimizer,
        finalize: Callable[[torch.Tensor], dict[str, float]] | None = None,
        clip_norm: float | None = None,
    ):
        super().__init__(optim, clip_norm)
        self.reconstruction_log_prob = reconstruction_log_prob
        self._finalize = finalize
        self._finalize_metrics: dict[str, float] = {}

    def objective(self, x: torch.Tensor) -> torch.Tensor:
        """The batch-summed reconstruction loss :math:`-\\sum_i \\log p(x_i \\mid e(x_i))`."""
        return -self.reconstruction_log_prob(x).sum()

    def finalize(self, train_x: torch.Tensor) -> None:
        """Post-training fit on the full training set ``train_x`` (shape ``(N, D)``).

        Deterministic given torch's global seed; a no-op without a ``finalize`` callable.
        """
        if self._finalize is not None:
            self._finalize_metrics = {k: float(v) for k, v in self._finalize(train_x).items()}

    def _extra_state(self) -> dict:
        return {"finalize_metrics": self._finalize_metrics}

    def _load_extra_state(self, state: dict) -> None:
        self._finalize_metrics = dict(state.get("finalize_metrics", {}))

    def metrics(self) -> dict[str, float]:
        """Diagnostics of the latest :meth:`finalize` (empty before it)."""
        return dict(self._finalize_metrics)
