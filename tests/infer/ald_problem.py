"""The ALD test problem: PPCA with three datapoints and its exact posterior.

Model: z_i ~ N(0, I_2), x_i | z_i ~ N(W z_i + mu, sigma^2 I_4); the exact posterior is
N(m_i, C) with C = sigma^2 (W^T W + sigma^2 I)^-1 and m_i = C W^T (x_i - mu) / sigma^2.
Tolerances are Z Monte Carlo standard errors from the effective sample size.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.stats import effective_sample_size
from seeding import offset_seed
from torch import nn

Z = 4.5
N, D, LATENT = 3, 4, 2


def make_problem(orthonormal: bool = True, width: int = N):
    """Data, model, encoder (trunk frozen, head weight = chain) and the exact posterior."""
    gen = torch.Generator().manual_seed(offset_seed(1))
    W = torch.randn(D, LATENT, generator=gen)
    mu = torch.randn(D, generator=gen)
    sigma = 0.6
    x = torch.randn(N, D, generator=gen) * 2

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + mu, sigma).to_event(1), obs=x)

    trunk = nn.Linear(D, width)
    head = nn.Linear(width, LATENT)
    with torch.no_grad():
        if orthonormal:  # trunk features of the data = an orthogonal matrix: G G^T = I
            q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen))
            trunk.weight.copy_((torch.linalg.pinv(x) @ q).T)
            trunk.bias.zero_()
        head.weight.normal_(generator=gen)
        head.bias.copy_(torch.randn(LATENT, generator=gen))
    encoder = nn.Sequential(trunk, head) if orthonormal else nn.Sequential(trunk, nn.Tanh(), head)
    for p in trunk.parameters():
        p.requires_grad_(False)
    cov = sigma**2 * torch.linalg.inv(W.T @ W + sigma**2 * torch.eye(LATENT))
    mean = (x - mu) @ W @ cov / sigma**2
    return x, model, encoder, mean, cov


def check_posterior(samples, mean, cov):
    """Every datapoint's mean and covariance entries within Z standard errors."""
    for i in range(N):
        z = samples[:, i]
        for a in range(LATENT):
            ess = effective_sample_size(z[None, :, a], 0, 1)
            se = (cov[a, a] / ess).sqrt()
            assert abs(z[:, a].mean() - mean[i, a]) < Z * se, (i, a)
            for b in range(a, LATENT):
                prod = (z[:, a] - mean[i, a]) * (z[:, b] - mean[i, b])
                # Var[(za - ma)(zb - mb)] = C_aa C_bb + C_ab^2 for a Gaussian
                sd = (cov[a, a] * cov[b, b] + cov[a, b] ** 2).sqrt()
                ess = effective_sample_size(prod[None], 0, 1)
                assert abs(prod.mean() - cov[a, b]) < Z * sd / ess.sqrt(), (i, a, b)
