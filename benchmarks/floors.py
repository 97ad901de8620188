r"""Hand-written torch floors: the same algorithms as pyro_lvm, with no Pyro in the loop.

Each floor uses the *same modules* (encoder, decoder) as the pyro_lvm variant it is
compared with (copies with identical weights) and the same data, and computes the same
quantity the way a careful hand-written torch script would: log densities in closed form
(constants that cancel are dropped), Python floats for scalar bookkeeping, one host sync
per step. They are the cost floor pyro_lvm's generality is measured against.

* :func:`vae_step`: single-sample reparameterized ELBO, Gaussian latents, Bernoulli
  likelihood (``binary_cross_entropy_with_logits``), one optimizer step.
* :class:`LAEStep`: Algorithm 2 of Taniguchi et al. (2022) exactly as
  :class:`pyro_lvm.infer.LAE` runs it: trunk features once per batch, ``T`` MALA
  transitions on the final layer's weight (graph of each state's potential kept), dual
  averaging of the step size towards 0.574 with a capped counter, then one optimizer step
  on the mean potential.
* :func:`iwae`: the ``K``-sample importance-weighted estimate per datapoint, particles in
  chunks of ``chunk`` as :func:`pyro_lvm.infer.iwae_log_likelihood` draws them.
* :func:`ais`: annealed importance sampling with MALA transitions, the sigmoid schedule,
  per-datapoint step sizes adapted on separate tuning chains (as
  :func:`pyro_lvm.infer.ais_log_likelihood`), one decoder forward and backward per step.
* :func:`sf_step` / :func:`vimco_step`: the Rao-Blackwellized score-function ELBO of a
  one-layer sigmoid belief net (what :class:`pyro_lvm.infer.TraceNVIL_ELBO` computes with
  no baseline), and VIMCO's ``K``-sample bound with leave-one-out signals.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["vae_step", "LAEStep", "iwae", "ais", "sf_step", "vimco_step"]


def _log_bernoulli(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log Bern(x; sigmoid(logits))`` summed over the last dim (broadcasting)."""
    return (x * logits - F.softplus(logits)).sum(-1)


# -- VAE --------------------------------------------------------------------------------


def vae_step(encoder: nn.Module, decoder: nn.Module, optim, x: torch.Tensor) -> float:
    """One SGD step on minus the single-sample ELBO (batch sum); returns the loss."""
    optim.zero_grad(set_to_none=True)
    loc, scale = encoder(x)
    eps = torch.randn_like(loc)
    z = loc + scale * eps
    log_px = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum")
    # log N(z; 0, 1) - log N(z; loc, scale): the log(2 pi) terms cancel
    log_pz_minus_qz = 0.5 * (eps.square().sum() - z.square().sum()) + scale.log().sum()
    loss = -(log_px + log_pz_minus_qz)
    loss.backward()
    optim.step()
    return loss.item()


# -- LAE --------------------------------------------------------------------------------


class LAEStep:
    """Hand-written LAE training step on a :class:`pyro_lvm.models.LangevinAutoencoder`'s
    modules (``encoder`` an ``nn.Sequential`` ending in ``nn.Linear``).

    ``optim`` must exclude the final layer's weight (the chain).
    """

    def __init__(
        self,
        encoder: nn.Sequential,
        decoder: nn.Module,
        optim,
        *,
        num_steps: int = 2,
        step_size: float = 1e-3,
        target: float = 0.574,
        max_t: int = 1000,
        seed: int = 0,
    ):
        self.trunk = nn.Sequential(*list(encoder)[:-1])
        self.head = encoder[-1]
        self.decoder, self.optim, self.num_steps = decoder, optim, num_steps
        self.step_size, self.target, self.max_t = step_size, target, max_t
        # dual averaging (Hoffman & Gelman 2014) in Python floats
        self.mu = math.log(10 * step_size)
        self.g_avg, self.t = 0.0, 0
        self.rng = random.Random(seed)

    def _potential(self, weight, features, x):
        z = F.linear(features, weight, self.head.bias)
        log_px = -F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        return 0.5 * z.square().sum() - log_px  # -log p(x, z) up to a constant

    def _evaluate(self, weight, features, x):
        weight = weight.detach().requires_grad_(True)
        v = self._potential(weight, features, x)
        (g,) = torch.autograd.grad(v, weight, retain_graph=True)
        return weight.detach(), v, g

    def _adapt(self, accept_prob: float) -> None:
        self.t += 1
        t = min(self.t, self.max_t)
        w = 1.0 / (t + 10.0)
        self.g_avg = (1 - w) * self.g_avg + w * (self.target - accept_prob)
        self.step_size = math.exp(self.mu - math.sqrt(t) / 0.05 * self.g_avg)

    def __call__(self, x: torch.Tensor) -> float:
        self.optim.zero_grad(set_to_none=True)
        features, state = self.prepare(x)
        w, potentials = self.transitions(features, x, state)
        return self.finish(w, potentials)

    def prepare(self, x: torch.Tensor):
        """The trunk features and the state ``(w, V, grad V)`` at the head's weight."""
        features = self.trunk(x)
        return features, self._evaluate(self.head.weight.detach().clone(), features, x)

    def transitions(self, features, x, state):
        """``num_steps`` MALA transitions; the final weight and the potentials (graphs kept)."""
        w, v, g = state
        potentials = []
        for _ in range(self.num_steps):
            eta = self.step_size
            w_new = w - eta * g + math.sqrt(2 * eta) * torch.randn_like(w)
            w_new, v_new, g_new = self._evaluate(w_new, features, x)
            forward = (w_new - w + eta * g).square().sum()
            backward = (w - w_new + eta * g_new).square().sum()
            log_a = float(v.detach() - v_new.detach() + (forward - backward) / (4 * eta))
            if not math.isfinite(log_a):
                log_a = -math.inf
            if math.log(self.rng.random() + 1e-300) < log_a:
                w, v, g = w_new, v_new, g_new
            potentials.append(v)
            self._adapt(math.exp(min(log_a, 0.0)))
        return w, potentials

    def finish(self, w, potentials) -> float:
        """Write the chain back, backpropagate the mean potential, step; the loss."""
        with torch.no_grad():
            self.head.weight.copy_(w)
        loss = sum(potentials) / self.num_steps
        loss.backward()
        self.optim.step()
        return float(loss.detach())


# -- likelihood estimators ------------------------------------------------------------------


@torch.no_grad()
def iwae(
    encoder: nn.Module, decoder: nn.Module, x: torch.Tensor, num_samples: int, chunk: int = 100
) -> torch.Tensor:
    """Per-datapoint ``log (1/K) sum_k p(x, z_k) / q(z_k | x)``, shape ``(B,)``."""
    loc, scale = encoder(x)
    const = scale.log().sum(-1)  # log q has -sum log scale; the log(2 pi) terms cancel
    log_w = []
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        eps = torch.randn((k,) + loc.shape, dtype=loc.dtype)
        z = loc + scale * eps
        log_px = _log_bernoulli(decoder(z), x)
        log_w.append(log_px + 0.5 * (eps.square() - z.square()).sum(-1) + const)
    return torch.cat(log_w).logsumexp(0) - math.log(num_samples)


def _sigmoid_schedule(num_steps: int, delta: float = 4.0) -> list[float]:
    t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    s = torch.sigmoid(delta * (2 * t - 1))
    betas = ((s - s[0]) / (s[-1] - s[0])).tolist()
    betas[0], betas[-1] = 0.0, 1.0
    return betas


def _loglik_and_grad(decoder, z, x):
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        log_lik = _log_bernoulli(decoder(z), x)
        (g,) = torch.autograd.grad(log_lik.sum(), z)
    return log_lik.detach(), g


def ais(
    decoder: nn.Module,
    x: torch.Tensor,
    latent_dim: int,
    *,
    num_steps: int,
    num_chains: int,
    num_tuning_chains: int = 2,
    step_size: float = 0.1,
    target: float = 0.574,
    max_t: int = 50,
) -> torch.Tensor:
    """AIS estimate of ``log p(x_i)`` per datapoint under ``N(0, I)`` and a Bernoulli decoder."""
    betas = _sigmoid_schedule(num_steps)
    c, b = num_chains + num_tuning_chains, x.shape[0]
    z = torch.randn(c, b, latent_dim)
    log_lik, g_lik = _loglik_and_grad(decoder, z, x)
    # potential V = -(log p(z) + beta log p(x|z)); at beta = 0 its gradient is z
    v, grad = 0.5 * z.square().sum(-1), z.clone()
    log_w = torch.zeros(c, b)
    log_eta = torch.full((b,), math.log(step_size))
    mu, g_avg = log_eta + math.log(10.0), torch.zeros(b)
    for t in range(1, len(betas)):
        d_beta, beta = betas[t] - betas[t - 1], betas[t]
        log_w += d_beta * log_lik
        if t == len(betas) - 1:
            break
        v, grad = v - d_beta * log_lik, grad - d_beta * g_lik
        eta = log_eta.exp().unsqueeze(-1)  # (B, 1), broadcast over chains
        z_new = z - eta * grad + (2 * eta).sqrt() * torch.randn_like(z)
        ll_new, gl_new = _loglik_and_grad(decoder, z_new, x)
        v_new = 0.5 * z_new.square().sum(-1) - beta * ll_new
        grad_new = z_new - beta * gl_new
        forward = (z_new - z + eta * grad).square().sum(-1)
        backward = (z - z_new + eta * grad_new).square().sum(-1)
        log_a = v - v_new + (forward - backward) / (4 * eta.squeeze(-1))
        log_a = torch.where(torch.isfinite(log_a), log_a, -math.inf)
        accept = torch.rand_like(log_a).log() < log_a
        keep = accept.unsqueeze(-1)
        z, grad = torch.where(keep, z_new, z), torch.where(keep, grad_new, grad)
        v, log_lik = torch.where(accept, v_new, v), torch.where(accept, ll_new, log_lik)
        g_lik = torch.where(keep, gl_new, g_lik)
        # dual averaging on the tuning chains only
        accept_prob = log_a[:num_tuning_chains].clamp(max=0.0).exp().mean(0)
        t_eff = min(t, max_t)
        w = 1.0 / (t_eff + 10.0)
        g_avg = (1 - w) * g_avg + w * (target - accept_prob)
        log_eta = mu - math.sqrt(t_eff) / 0.05 * g_avg
    return log_w[num_tuning_chains:].logsumexp(0) - math.log(num_chains)


# -- score-function estimators -------------------------------------------------------------


def sf_step(encoder, decoder, prior_logits, optim, x: torch.Tensor) -> float:
    """Rao-Blackwellized score-function ELBO step of a one-layer SBN (no baseline)."""
    optim.zero_grad(set_to_none=True)
    q_logits = encoder(x)
    with torch.no_grad():
        z = torch.bernoulli(torch.sigmoid(q_logits))
    log_q = _log_bernoulli(q_logits, z)
    log_p = _log_bernoulli(prior_logits.expand_as(z), z) + _log_bernoulli(decoder(z), x)
    elbo = log_p - log_q  # (B,): each datapoint's downstream cost
    surrogate = elbo + log_q * elbo.detach()
    loss = -(elbo.sum().detach() + (surrogate - surrogate.detach()).sum())
    loss.backward()
    optim.step()
    return loss.item()


def vimco_step(encoder, decoder, prior_logits, optim, x: torch.Tensor, num_particles: int):
    """VIMCO step of a one-layer SBN: ``K``-sample bound, leave-one-out signals."""
    optim.zero_grad(set_to_none=True)
    k = num_particles
    q_logits = encoder(x)
    with torch.no_grad():
        z = torch.bernoulli(torch.sigmoid(q_logits).expand((k,) + q_logits.shape))
    log_q = _log_bernoulli(q_logits, z)  # (K, B)
    log_w = _log_bernoulli(prior_logits.expand_as(z), z) + _log_bernoulli(decoder(z), x) - log_q
    bound = log_w.logsumexp(0) - math.log(k)
    with torch.no_grad():  # L - L_{-j}: w_j replaced by the others' geometric mean
        lw = log_w.detach()
        others = (lw.sum(0, keepdim=True) - lw) / (k - 1)
        loo = lw.unsqueeze(0).repeat(k, 1, 1)
        idx = torch.arange(k)
        loo[idx, idx] = others
        signals = (bound + math.log(k)) - loo.logsumexp(1)
    surrogate = bound + (signals * log_q).sum(0)
    loss = -(bound.sum().detach() + (surrogate - surrogate.detach()).sum())
    loss.backward()
    optim.step()
    return loss.item()
