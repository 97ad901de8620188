"""VAE-flow: a valid bound on linear-Gaussian data, identity at init, checkpointable."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from pyro.infer import Trace_ELBO
from seeding import offset_seed

from pyro_lvm.infer import ModuleSVI, log_importance_weights
from pyro_lvm.models import VAE, VAEFlow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
from linear_gaussian import exact_log_likelihood, linear_gaussian_vae, sample_data  # noqa: E402


def _flow_on(vae: VAE, **kwargs) -> VAEFlow:
    """A VAE-flow sharing ``vae``'s (linear) decoder and fixed likelihood."""
    return VAEFlow(
        vae.data_dim,
        vae.latent_dim,
        decoder=vae.decoder,
        likelihood=vae.likelihood,
        hidden_dim=32,
        depth=1,
        **kwargs,
    )


@pytest.mark.parametrize("flow", ["iaf", "planar"])
def test_elbo_below_exact_log_likelihood_and_iwae_converges(flow):
    torch.manual_seed(offset_seed(0))
    truth = linear_gaussian_vae(data_dim=6, latent_dim=2, sigma=0.5, seed=1)
    x = sample_data(truth, 64, seed=2)
    vf = _flow_on(truth, num_flows=2, flow=flow, context_dim=8)
    for p in vf.decoder.parameters():
        p.requires_grad_(False)
    svi = ModuleSVI(
        vf.model,
        vf.guide,
        torch.optim.Adam([p for p in vf.parameters() if p.requires_grad], lr=1e-2),
        loss=Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1),
    )
    for _ in range(300):
        svi.step(x)
    exact = exact_log_likelihood(truth, x)
    torch.manual_seed(offset_seed(3))
    log_w = log_importance_weights(vf.model, vf.guide, x, num_samples=400)
    # ELBO <= log p(x) for every datapoint; the per-datapoint MC error is std/sqrt(K)
    elbo, se = log_w.mean(0), log_w.std(0) / math.sqrt(log_w.shape[0])
    assert (elbo <= exact + 4 * se + 1e-6).all()
    # the trained flow guide is close to the exact posterior: a small gap ...
    gap = (exact - elbo).mean()
    assert 0 <= gap + 4 * se.mean() and gap < 0.15
    # ... which importance weighting closes (IWAE -> log p(x) as K grows)
    log_w = log_importance_weights(vf.model, vf.guide, x, num_samples=2000)
    iwae = log_w.logsumexp(0) - math.log(log_w.shape[0])
    # delta method: sd of log(mean w) is sd(w) / (mean(w) sqrt(K))
    w = (log_w - log_w.max(0).values).exp()
    se = w.std(0) / (w.mean(0) * math.sqrt(w.shape[0]))
    assert (iwae <= exact + 4 * se + 1e-6).all()
    mean_se = se.pow(2).mean().sqrt() / math.sqrt(len(se))
    assert (exact - iwae).mean() < 0.2 * gap + 4 * mean_se


@pytest.mark.parametrize("context_dim", [0, 4])
def test_identity_flow_equals_plain_vae(context_dim):
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(data_dim=6, latent_dim=2, sigma=0.5, hidden_dim=16, depth=1)
    vf = VAEFlow(
        6,
        2,
        num_flows=3,
        context_dim=context_dim,
        decoder=vae.decoder,
        likelihood=vae.likelihood,
        hidden_dim=16,
        depth=1,
    )
    with torch.no_grad():  # copy the Gaussian encoder; the context outputs are extra rows
        for mine, theirs in zip(vf.encoder, vae.encoder):
            if isinstance(theirs, torch.nn.Linear):
                mine.weight[: theirs.out_features].copy_(theirs.weight)
                mine.bias[: theirs.out_features].copy_(theirs.bias)
    x = sample_data(vae, 16)
    torch.manual_seed(offset_seed(5))
    plain = log_importance_weights(vae.model, vae.guide, x, num_samples=20)
    torch.manual_seed(offset_seed(5))  # common random numbers: the same base draws
    flowed = log_importance_weights(vf.model, vf.guide, x, num_samples=20)
    assert torch.allclose(plain, flowed, atol=1e-5)


def test_state_dict_round_trip():
    torch.manual_seed(offset_seed(0))
    vf = VAEFlow(6, 2, num_flows=2, hidden_dim=16, depth=1)
    with torch.no_grad():  # move the flows off the identity
        for p in vf.flows.parameters():
            p.add_(0.3 * torch.randn_like(p))
    torch.manual_seed(offset_seed(1))  # another random variable order in each MADE
    other = VAEFlow(6, 2, num_flows=2, hidden_dim=16, depth=1)
    other.load_state_dict(vf.state_dict())
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    torch.manual_seed(offset_seed(2))
    a = log_importance_weights(vf.model, vf.guide, x, num_samples=5)
    torch.manual_seed(offset_seed(2))
    b = log_importance_weights(other.model, other.guide, x, num_samples=5)
    assert torch.allclose(a, b)
    assert other.encode(x).shape == (8, 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_flows": -1}, "num_flows"),
        ({"flow": "radial"}, "flow"),
        ({"context_dim": -1}, "context_dim"),
        ({"latent_dim": 0}, "latent_dim"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"data_dim": 6, "latent_dim": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        VAEFlow(**args)
