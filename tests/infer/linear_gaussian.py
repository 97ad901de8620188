r"""A linear-Gaussian VAE (PPCA) with closed-form likelihood and posterior.

:class:`pyro_lvm.models.VAE` with a linear decoder :math:`\mu(z) = Wz + b` and a fixed
Gaussian likelihood of scale :math:`\sigma`:

.. math::

    p(x) = \mathcal N(b, WW^\top + \sigma^2 I), \qquad
    p(z \mid x) = \mathcal N\bigl(\Sigma W^\top (x - b)/\sigma^2,\ \Sigma\bigr),\quad
    \Sigma = (I + W^\top W/\sigma^2)^{-1}.

Shared by the AIS, refinement and DLGM tests.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from seeding import offset_seed
from torch import nn

from pyro_lvm.models import VAE, GaussianLikelihood


def linear_gaussian_vae(
    data_dim: int = 10, latent_dim: int = 3, sigma: float = 0.3, seed: int = 0, **vae_kwargs
) -> VAE:
    """A VAE whose decoder is ``nn.Linear`` with random weights and a fixed scale."""
    g = torch.Generator().manual_seed(offset_seed(seed))
    decoder = nn.Linear(latent_dim, data_dim)
    with torch.no_grad():
        decoder.weight.copy_(torch.randn(data_dim, latent_dim, generator=g))
        decoder.bias.copy_(torch.randn(data_dim, generator=g))
    likelihood = GaussianLikelihood(scale=sigma, learn_scale=False)
    vae_kwargs.setdefault("hidden_dim", 16)
    vae_kwargs.setdefault("depth", 1)
    return VAE(data_dim, latent_dim, likelihood=likelihood, decoder=decoder, **vae_kwargs)


def sample_data(vae: VAE, num: int, seed: int = 1) -> torch.Tensor:
    """Draws from the model."""
    g = torch.Generator().manual_seed(offset_seed(seed))
    W, b, s = _params(vae)
    z = torch.randn(num, W.shape[1], generator=g, dtype=W.dtype)
    return (z @ W.T + b + s * torch.randn(num, W.shape[0], generator=g, dtype=W.dtype)).detach()


def _params(vae: VAE):
    W, b = vae.decoder.weight, vae.decoder.bias
    s = vae.likelihood.scale.squeeze()
    return W, b, s


@torch.no_grad()
def exact_log_likelihood(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    W, b, s = _params(vae)
    cov = W @ W.T + s**2 * torch.eye(W.shape[0], dtype=W.dtype)
    return dist.MultivariateNormal(b, cov).log_prob(x)


@torch.no_grad()
def exact_posterior(vae: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means ``(B, Z)`` and the shared covariance ``(Z, Z)``."""
    W, b, s = _params(vae)
    cov = torch.linalg.inv(torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W / s**2)
    return (x - b) @ W @ cov / s**2, cov
