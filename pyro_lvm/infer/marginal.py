r"""Gradient ascent on an exact marginal likelihood.

When :math:`\log p_\theta(x) = \log \int p_\theta(x \mid z)\,p(z)\,dz` is available in
closed form (PPCA, any linear-Gaussian model, a mixture with few components), the latent
variables can be integrated out exactly and :math:`\theta` fitted by minimising

.. math::

    \mathcal L(\theta) = -\sum_{n \in \text{batch}} \log p_\theta(x_n)

with any :mod:`torch.optim` optimizer: no guide and no ELBO gap. It is the reference
point for variational training of the same model (Ambrogioni, "Latent variable models and
variational autoencoders", lecture notes: "PCA by gradient descent").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_lvm.infer.driver import OptimizerDriver

__all__ = ["MarginalLikelihoodGD"]


class MarginalLikelihoodGD(OptimizerDriver):
    """SVI-like driver minimising the exact negative marginal log-likelihood.

    Parameters
    ----------
    log_likelihood : callable or model
        ``log_likelihood(x) -> Tensor`` of per-datapoint exact :math:`\\log p(x_n)`, shape
        ``(B,)``, differentiable in the parameters being trained; or any object with such
        an ``exact_log_likelihood`` method (e.g. a :class:`~pyro_lvm.models.PPCA`), which
        is then used.
    optim : torch.optim.Optimizer
        Optimizer over the parameters to fit.
    clip_norm : float, optional
        Clip the global gradient norm before each step.

    Examples
    --------
    >>> ppca = PPCA(data_dim=64, latent_dim=5)                       # doctest: +SKIP
    >>> gd = MarginalLikelihoodGD(ppca.exact_log_likelihood,
    ...                           torch.optim.Adam(ppca.parameters(), lr=1e-2))
    >>> loss = gd.step(x)   # -sum_n log p(x_n)
    """

    track_grad_norm = True  # reported by metrics()

    def __init__(
        self,
        log_likelihood: Callable[[torch.Tensor], torch.Tensor] | object,
        optim: torch.optim.Optimizer,
        clip_norm: float | None = None,
    ):
        super().__init__(optim, clip_norm)
        log_likelihood = getattr(log_likelihood, "exact_log_likelihood", log_likelihood)
        if not callable(log_likelihood):
            raise ValueError(
                "MarginalLikelihoodGD needs a callable log_likelihood(x) or a model with an "
                "exact_log_likelihood method; pass e.g. model.exact_log_likelihood"
            )
        self.log_likelihood = log_likelihood

    def objective(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`-\\sum_n \\log p(x_n)` over the batch, differentiable."""
        log_p = self.log_likelihood(x)
        if log_p.shape != x.shape[:1]:
            raise ValueError(
                f"log_likelihood(x) must return one value per datapoint, shape "
                f"{tuple(x.shape[:1])}, got {tuple(log_p.shape)}"
            )
        return -log_p.sum()

    def metrics(self) -> dict[str, float]:
        """``grad_norm``: global gradient norm of the latest step (before clipping)."""
        return {"grad_norm": self.grad_norm}
