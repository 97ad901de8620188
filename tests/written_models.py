r"""Small linear-Gaussian models written the ways other people write Pyro models, each with
its exact marginal likelihood and exact posterior.

Every model here is :math:`z_i \sim \mathcal N(0, I_L)`,
:math:`x_i \mid z_i \sim \mathcal N(A z_i + c, \sigma^2 I_D)` (plus, for the semi-supervised
one, a one-hot class :math:`y_i` that shifts the mean by :math:`M^\top y_i`), so

.. math::

    p(x_i) = \mathcal N(c, AA^\top + \sigma^2 I), \qquad
    p(z_i \mid x_i) = \mathcal N\bigl(\Sigma A^\top (x_i - c)/\sigma^2, \Sigma\bigr),\quad
    \Sigma = (I + A^\top A/\sigma^2)^{-1}.

With the exact posterior as the guide every importance weight equals :math:`p(x)`: an
estimator that gets any term wrong is off by far more than rounding.

The styles: a data plate (``pyro.plate("data", n)``), no plate at all (the rows inside an
event dimension), a plate without a size (Pyro's SS-VAE), an observation masked with
``poutine.mask`` (Pyro's ``hmm.py``), an ``.expand`` to the number of rows, a decoder with a
``BatchNorm1d`` layer (ProdLDA), and a decoder that indexes rows out of a flattened batch
(runs with a particle dimension, but mixes particles).
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

D, L, C = 3, 2, 3
SIGMA = 0.5


def params(dtype=torch.float64):
    """The decoder ``A`` (D, L), offset ``c`` (D,) and class means ``M`` (C, D)."""
    g = torch.Generator().manual_seed(7)
    A = torch.randn(D, L, generator=g, dtype=dtype)
    c = torch.randn(D, generator=g, dtype=dtype)
    M = 2 * torch.randn(C, D, generator=g, dtype=dtype)
    return A, c, M


def data(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, D, generator=g, dtype=dtype)


def exact_log_likelihood(x, A, c) -> torch.Tensor:
    cov = A @ A.T + SIGMA**2 * torch.eye(D, dtype=x.dtype)
    return dist.MultivariateNormal(c, cov).log_prob(x)


def exact_posterior(x, A, c) -> dist.MultivariateNormal:
    """:math:`p(z_i \\mid x_i)`, batch shape ``x.shape[:-1]``."""
    cov = torch.linalg.inv(torch.eye(L, dtype=x.dtype) + A.T @ A / SIGMA**2)
    return dist.MultivariateNormal((x - c) @ A @ cov / SIGMA**2, cov)


# -- with and without a data plate ----------------------------------------------------


def model_plate(x, A, c, mask=None):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(L), 1.0).to_event(1))
        with poutine.mask(mask=mask) if mask is not None else contextlib.nullcontext():
            pyro.sample("x", dist.Normal(z @ A.T + c, SIGMA).to_event(1), obs=x)


def guide_plate(x, A, c, mask=None, inflate=1.0):
    """The exact posterior (the prior for masked rows), its scale widened by ``inflate``."""
    post = exact_posterior(x, A, c)
    loc, cov = post.loc, post.covariance_matrix * inflate**2
    if mask is not None:  # a masked row's posterior is its prior
        loc = torch.where(mask.unsqueeze(-1), loc, 0.0)
        cov = torch.where(mask[:, None, None], cov, torch.eye(L, dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.MultivariateNormal(loc, cov))


def model_no_plate(x, A, c):
    z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], L), 1.0).to_event(2))
    pyro.sample("x", dist.Normal(z @ A.T + c, SIGMA).to_event(2), obs=x)


def guide_no_plate(x, A, c, inflate=1.0):
    post = exact_posterior(x, A, c)
    loc, cov = post.loc, post.covariance_matrix * inflate**2
    pyro.sample("z", dist.MultivariateNormal(loc, cov).to_event(1))


# -- models that cannot take a particle dimension --------------------------------------


def model_expand(x, A, c):
    """The likelihood expanded to the number of rows, as written for one draw."""
    n = x.shape[0]
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(x.new_zeros(L), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ A.T + c, SIGMA).to_event(1).expand([n]), obs=x)


def model_mixing(x, A, c):
    """Rows taken out of a flattened batch: right as written, wrong with particles."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(L), 1.0).to_event(1))
        rows = z.reshape(-1, L)[: x.shape[0]]
        pyro.sample("x", dist.Normal(rows @ A.T + c, SIGMA).to_event(1), obs=x)


class BatchNormDecoder(nn.Module):
    """``BatchNorm1d(Linear(z))`` in eval mode: affine, so the model stays linear-Gaussian."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        A, c, _ = params(dtype)
        self.linear = nn.Linear(L, D).to(dtype)
        self.norm = nn.BatchNorm1d(D).to(dtype)
        with torch.no_grad():
            self.linear.weight.copy_(A)
            self.linear.bias.copy_(c)
            self.norm.running_mean.copy_(torch.tensor([0.5, -1.0, 0.2]))
            self.norm.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
            self.norm.weight.copy_(torch.tensor([1.5, 0.7, -1.2]))
            self.norm.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
        self.eval()

    def affine(self):
        """The decoder as ``(A, c)``."""
        n = self.norm
        g = n.weight / (n.running_var + n.eps).sqrt()
        A = g.unsqueeze(-1) * self.linear.weight
        c = (self.linear.bias - n.running_mean) * g + n.bias
        return A.detach(), c.detach()

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(L), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self(z), SIGMA).to_event(1), obs=x)

    def forward(self, z):
        return self.norm(self.linear(z))


# -- semi-supervised, Pyro's SS-VAE style ----------------------------------------------


def ss_model(xs, ys=None, *, A, c, M):
    """A class ``y`` (observed when labelled) and a style ``z``; an unsized data plate."""
    n = xs.shape[0]
    with pyro.plate("data"):
        z = pyro.sample("z", dist.Normal(xs.new_zeros(n, L), 1.0).to_event(1))
        ys = pyro.sample("y", dist.OneHotCategorical(xs.new_ones(n, C) / C), obs=ys)
        pyro.sample("x", dist.Normal(z @ A.T + ys @ M + c, SIGMA).to_event(1), obs=xs)


def ss_exact(xs, A, c, M) -> torch.Tensor:
    """:math:`\\log p(x_i, y_i = k)`, shape ``(n, C)``."""
    per_class = [exact_log_likelihood(xs, A, c + M[k]) for k in range(C)]
    return torch.stack(per_class, -1) - torch.log(torch.tensor(float(C), dtype=xs.dtype))


def ss_guide(xs, ys=None, *, A, c, M):
    """The exact posterior: :math:`p(y \\mid x)`, then :math:`p(z \\mid x, y)`."""
    with pyro.plate("data"):
        if ys is None:
            ys = pyro.sample("y", dist.OneHotCategorical(logits=ss_exact(xs, A, c, M)))
        pyro.sample("z", exact_posterior(xs - ys @ M, A, c))
