"""A tiny Bernoulli-latent model whose ELBO (and K-sample bound) can be enumerated exactly.

Shared by the estimator tests (``test_nvil.py``, ``test_vimco.py``). One layer: 3 latents;
two layers: ``z2`` (2 bits) -> ``z1`` (2 bits) -> ``x`` with guide ``x -> z1 -> z2``, so
the downstream costs of ``z1`` and ``z2`` differ (Rao-Blackwellization matters).
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from seeding import offset_seed
from torch import nn

DATA = torch.tensor(
    [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]], dtype=torch.float64
)


def _bern(logits):
    return dist.Bernoulli(logits=logits).to_event(1)


class ToySBN(nn.Module):
    def __init__(self, layers: int = 1, num_data: int | None = None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(offset_seed(seed))

        def p(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64))

        d = DATA.shape[1]
        self.layers, self.num_data = layers, num_data
        self.sizes = [3] if layers == 1 else [2, 2]
        top = self.sizes[-1]
        self.prior_logits = p(top)
        self.dec = nn.ParameterList([p(d, self.sizes[0]), p(d)])  # z1 -> x
        self.enc = nn.ParameterList([p(self.sizes[0], d), p(self.sizes[0])])  # x -> z1
        if layers == 2:
            self.dec2 = nn.ParameterList([p(2, 2), p(2)])  # z2 -> z1
            self.enc2 = nn.ParameterList([p(2, 2), p(2)])  # z1 -> z2

    def plate(self, x, idx=None):
        size = self.num_data if (idx is not None and self.num_data) else x.shape[0]
        return pyro.plate("data", size, subsample=idx, dim=-1)

    # generative model and guide --------------------------------------------------------
    def model(self, x, idx=None):
        with self.plate(x, idx):
            prior = self.prior_logits.expand(x.shape[0], -1)
            if self.layers == 1:
                z1 = pyro.sample("z1", _bern(prior))
            else:
                z2 = pyro.sample("z2", _bern(prior))
                z1 = pyro.sample("z1", _bern(z2 @ self.dec2[0].T + self.dec2[1]))
            pyro.sample("x", _bern(z1 @ self.dec[0].T + self.dec[1]), obs=x)

    def guide(self, x, idx=None):
        with self.plate(x, idx):
            z1 = pyro.sample("z1", _bern(x @ self.enc[0].T + self.enc[1]))
            if self.layers == 2:
                pyro.sample("z2", _bern(z1 @ self.enc2[0].T + self.enc2[1]))

    # exact quantities ---------------------------------------------------------------------
    def states(self):
        """Every joint latent configuration as a dict of (S, bits) tensors."""
        bits = sum(self.sizes)
        allz = torch.tensor(list(itertools.product([0.0, 1.0], repeat=bits)), dtype=torch.float64)
        out = {"z1": allz[:, : self.sizes[0]]}
        if self.layers == 2:
            out["z2"] = allz[:, self.sizes[0] :]
        return out

    def log_joint_and_q(self, x, z):
        """log p(x, z) and log q(z | x), shape (S, B), for state tensors (S, 1, bits)."""
        z1 = z["z1"]
        log_q = _bern(x @ self.enc[0].T + self.enc[1]).log_prob(z1)
        log_p = _bern(z1 @ self.dec[0].T + self.dec[1]).log_prob(x)
        if self.layers == 1:
            log_p = log_p + _bern(self.prior_logits).log_prob(z1)
        else:
            z2 = z["z2"]
            log_q = log_q + _bern(z1 @ self.enc2[0].T + self.enc2[1]).log_prob(z2)
            log_p = log_p + _bern(self.prior_logits).log_prob(z2)
            log_p = log_p + _bern(z2 @ self.dec2[0].T + self.dec2[1]).log_prob(z1)
        return log_p, log_q

    def exact_elbo(self, x, scale: float = 1.0):
        z = {k: v.unsqueeze(1) for k, v in self.states().items()}
        log_p, log_q = self.log_joint_and_q(x, z)
        return scale * (log_q.exp() * (log_p - log_q)).sum()

    def exact_iwae_bound(self, x, k: int):
        """E[log (1/K) sum_k w_k] by enumerating all joint states of K particles."""
        z = {n: v.unsqueeze(1) for n, v in self.states().items()}
        log_p, log_q = self.log_joint_and_q(x, z)  # (S, B)
        s = log_p.shape[0]
        total = 0.0
        for combo in itertools.product(range(s), repeat=k):
            c = list(combo)
            log_qs = log_q[c].sum(0)
            bound = torch.logsumexp(log_p[c] - log_q[c], 0) - math.log(k)
            total = total + (log_qs.exp() * bound).sum()
        return total

    def exact_whole_program_bound(self, x, k: int = 2):
        """E[log (1/K) sum_k w_k] with one weight per particle for all rows together
        (each particle a joint state of every row's latents), by enumeration."""
        assert k == 2
        z = {n: v.unsqueeze(1) for n, v in self.states().items()}
        log_p, log_q = self.log_joint_and_q(x, z)  # (S, B)
        s, b = log_p.shape
        log_w = log_q.new_zeros((1,) * b)
        log_qs = log_q.new_zeros((1,) * b)
        for row in range(b):  # the joint states of all rows: (S,) * B, flattened
            shape = [1] * b
            shape[row] = s
            log_w = log_w + (log_p[:, row] - log_q[:, row]).reshape(shape)
            log_qs = log_qs + log_q[:, row].reshape(shape)
        log_w, log_qs = log_w.reshape(-1), log_qs.reshape(-1)
        pair = torch.logaddexp(log_w[:, None], log_w[None]) - math.log(k)
        return ((log_qs[:, None] + log_qs[None]).exp() * pair).sum()

    def exact_log_marginal(self, x):
        z = {k: v.unsqueeze(1) for k, v in self.states().items()}
        log_p, _ = self.log_joint_and_q(x, z)
        return log_p.logsumexp(0)


def flat_grad(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def exact_grad(module: nn.Module, objective) -> torch.Tensor:
    module.zero_grad()
    (-objective()).backward()
    g = flat_grad(module).clone()
    module.zero_grad()
    return g


def estimate_grads(module, loss_fn, repeats: int, after_step=None) -> torch.Tensor:
    """Stack ``repeats`` independent gradient estimates of ``loss_fn`` -> (repeats, P)."""
    out = []
    loss_fn().backward()  # one validated pass, then validation off for speed
    with pyro.validation_enabled(False):
        out.extend(_repeat(module, loss_fn, repeats, after_step))
    module.zero_grad()
    return torch.stack(out)


def _repeat(module, loss_fn, repeats, after_step):
    out = []
    for _ in range(repeats):
        module.zero_grad()
        loss_fn().backward()
        out.append(flat_grad(module).clone())
        if after_step is not None:
            after_step()
    return out


def assert_unbiased(samples: torch.Tensor, exact: torch.Tensor, z: float = 4.0) -> None:
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    err = (mean - exact).abs()
    bad = err > z * se + 1e-9
    assert not bad.any(), (
        f"biased: max |mean - exact| / se = {(err / (se + 1e-30)).max():.2f} at "
        f"{bad.nonzero().flatten().tolist()}"
    )


def assert_unbiased_log_weights(log_w: torch.Tensor, exact: torch.Tensor, z: float = 5.0) -> None:
    """An unbiased likelihood estimator: ``E[exp(log_w - exact)] = 1`` per row, over the
    draws in dimension 0, within ``z`` Monte Carlo standard errors."""
    assert_unbiased((log_w - exact).exp(), torch.ones_like(exact), z=z)
