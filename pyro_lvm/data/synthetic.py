r"""Synthetic data with known ground truth.

- :func:`ppca_data`: :math:`x = W z + \mu + \sigma\epsilon`, :math:`z, \epsilon \sim
  \mathcal N(0, I)`; the exact likelihood and posterior are known (PPCA).
- :func:`binary_latent_data`: a one-layer sigmoid belief net with random weights,
  :math:`z \sim \mathrm{Bern}(\sigma(b))`, :math:`x \sim \mathrm{Bern}(\sigma(Vz + c))`;
  with few latents, :math:`\log p(x)` is exact by enumerating :math:`2^K` states.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from pyro_lvm.data.bundle import DataBundle

__all__ = ["SyntheticTruth", "ppca_data", "binary_latent_data"]


class SyntheticTruth(NamedTuple):
    """Generating parameters and latents of a synthetic dataset."""

    params: dict[str, torch.Tensor]
    train_z: torch.Tensor
    test_z: torch.Tensor


def _split(n: int, n_test: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return perm[n_test:], perm[:n_test]


def ppca_data(
    num: int = 1000,
    data_dim: int = 10,
    latent_dim: int = 2,
    noise_std: float = 0.1,
    num_test: int | None = None,
    seed: int = 0,
) -> tuple[DataBundle, SyntheticTruth]:
    """Draw PPCA data; returns the bundle (real-valued, use a Gaussian likelihood) and truth."""
    if not (num > 1 and data_dim > 0 and 0 < latent_dim and noise_std > 0):
        raise ValueError("ppca_data needs num > 1, data_dim > 0, latent_dim > 0, noise_std > 0")
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(data_dim, latent_dim, generator=gen)
    mu = torch.randn(data_dim, generator=gen)
    z = torch.randn(num, latent_dim, generator=gen)
    x = z @ W.T + mu + noise_std * torch.randn(num, data_dim, generator=gen)
    train, test = _split(num, num_test or max(1, num // 5), gen)
    bundle = DataBundle("ppca-synthetic", x[train], x[test], binary_probs=False)
    truth = SyntheticTruth({"W": W, "mu": mu, "sigma": torch.tensor(noise_std)}, z[train], z[test])
    return bundle, truth


def binary_latent_data(
    num: int = 1000,
    data_dim: int = 16,
    latent_dim: int = 4,
    num_test: int | None = None,
    seed: int = 0,
) -> tuple[DataBundle, SyntheticTruth]:
    """Draw binary data from a random one-layer sigmoid belief net (binary x in {0, 1})."""
    if not (num > 1 and data_dim > 0 and latent_dim > 0):
        raise ValueError("binary_latent_data needs num > 1, data_dim > 0, latent_dim > 0")
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(latent_dim, generator=gen)
    V = 3.0 * torch.randn(data_dim, latent_dim, generator=gen)
    c = torch.randn(data_dim, generator=gen) - 0.5 * V.sum(-1)
    z = torch.bernoulli(torch.sigmoid(b).expand(num, latent_dim), generator=gen)
    x = torch.bernoulli(torch.sigmoid(z @ V.T + c), generator=gen)
    train, test = _split(num, num_test or max(1, num // 5), gen)
    bundle = DataBundle("binary-synthetic", x[train], x[test])
    truth = SyntheticTruth({"prior_logits": b, "V": V, "c": c}, z[train], z[test])
    return bundle, truth


def binary_latent_log_likelihood(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Exact :math:`\\log p(x)` under :func:`binary_latent_data`'s model, by enumeration."""
    b, V, c = params["prior_logits"], params["V"], params["c"]
    k = b.shape[0]
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=k)), dtype=x.dtype)
    log_prior = torch.distributions.Bernoulli(logits=b).log_prob(states).sum(-1)  # (S,)
    logits = states @ V.T + c  # (S, D)
    log_lik = torch.distributions.Bernoulli(logits=logits.unsqueeze(1)).log_prob(x).sum(-1)
    return (log_prior.unsqueeze(1) + log_lik).logsumexp(0)
