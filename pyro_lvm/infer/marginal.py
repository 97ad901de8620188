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

from pyro_lvm.infer.diagnostics import check_loss

__all__ = ["MarginalLikelihoodGD"]


class MarginalLikelihoodGD:
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

    def __init__(
        self,
        log_likelihood: Callable[[torch.Tensor], torch.Tensor] | object,
        optim: torch.optim.Optimizer,
        clip_norm: float | None = None,
    ):
        log_likelihood = getattr(log_likelihood, "exact_log_likelihood", log_likelihood)
        if not callable(log_likelihood):
            raise ValueError(
                "MarginalLikelihoodGD needs a callable log_likelihood(x) or a model with an "
                "exact_log_likelihood method; pass e.g. model.exact_log_likelihood"
            )
        self.log_likelihood, self.optim, self.clip_norm = log_likelihood, optim, clip_norm
        self._grad_norm = float("nan")

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optim.param_groups for p in group["params"]]

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        log_p = self.log_likelihood(x)
        if log_p.shape != x.shape[:1]:
            raise ValueError(
                f"log_likelihood(x) must return one value per datapoint, shape "
                f"{tuple(x.shape[:1])}, got {tuple(log_p.shape)}"
            )
        return -log_p.sum()

    def step(self, x: torch.Tensor) -> float:
        """One gradient step; returns :math:`-\\sum_n \\log p(x_n)` over the batch."""
        self.optim.zero_grad(set_to_none=True)
        loss = self._loss(x)
        check_loss(loss)
        loss.backward()
        params = [p for p in self._params() if p.grad is not None]
        max_norm = self.clip_norm if self.clip_norm is not None else float("inf")
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optim.step()
        return loss.item()

    @torch.no_grad()
    def evaluate_loss(self, x: torch.Tensor) -> float:
        """:math:`-\\sum_n \\log p(x_n)` without a step."""
        return self._loss(x).item()

    def state_dict(self) -> dict:
        return {"optim": self.optim.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state["optim"])

    def metrics(self) -> dict[str, float]:
        """``grad_norm``: global gradient norm of the latest step (before clipping)."""
        return {"grad_norm": self._grad_norm}
