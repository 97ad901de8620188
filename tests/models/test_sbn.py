"""Sigmoid belief nets and the Bernoulli VAE: structure, exact likelihoods, bad input."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from seeding import offset_seed
from torch import nn

from pyro_lvm.infer import TraceNVIL_ELBO, log_importance_weights
from pyro_lvm.models import BernoulliVAE, GaussianLikelihood, SigmoidBeliefNet


def _binary(n, d, seed=0):
    return torch.bernoulli(
        torch.full((n, d), 0.4), generator=torch.Generator().manual_seed(offset_seed(seed))
    )


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("nonlinear", [False, True])
def test_sites_and_shapes(num_layers, nonlinear):
    sbn = SigmoidBeliefNet(12, 5, num_layers=num_layers, nonlinear=nonlinear, hidden_dim=7)
    x = _binary(4, 12)
    guide_tr = poutine.trace(sbn.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(sbn.model, guide_tr)).get_trace(x)
    names = [f"z{l}" for l in range(1, num_layers + 1)]
    assert sbn.latent_sites == tuple(names) and sbn.latent_site == "z1"
    for name in names:
        site = guide_tr.nodes[name]
        assert site["value"].shape == (4, 5)
        assert site["fn"].event_shape == (5,)
        assert model_tr.nodes[name]["cond_indep_stack"][0].name == "data"
    assert model_tr.nodes["x"]["value"] is x
    assert isinstance(sbn.prior_logits, nn.Parameter)
    linears = [m for m in sbn.encoders[0] if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == (
        [(12, 7), (7, 7), (7, 5)] if nonlinear else [(12, 5)]
    )
    if nonlinear:
        assert any(
            isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.3 for m in sbn.encoders[0]
        )


def test_benchmark_architecture_sizes():
    linear = SigmoidBeliefNet(784, 200)
    nonlinear = SigmoidBeliefNet(784, 200, nonlinear=True, hidden_dim=200)
    # 784->200 logits and back, plus prior logits
    assert sum(p.numel() for p in linear.parameters()) == 2 * 784 * 200 + 784 + 200 + 200
    assert [m.out_features for m in nonlinear.encoders[0] if isinstance(m, nn.Linear)] == [
        200,
        200,
        200,
    ]


def _exact_log_marginal(sbn, x):
    """log p(x) by summing over every joint state of the latents."""
    d = sbn.latent_dim
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d * sbn.num_layers)))
    layers = states.split(d, dim=-1)  # z1, z2, ...
    log_p = dist.Bernoulli(logits=sbn.prior_logits).to_event(1).log_prob(layers[-1])
    for l in range(sbn.num_layers - 1):
        logits = sbn.decoders[l](layers[l + 1])
        log_p = log_p + dist.Bernoulli(logits=logits).to_event(1).log_prob(layers[l])
    lik = sbn.likelihood(sbn.decoder(layers[0]).unsqueeze(1)).log_prob(x)  # (S, B)
    return (log_p.unsqueeze(1) + lik).logsumexp(0)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_iwae_evaluator_converges_to_exact_log_likelihood(num_layers):
    torch.manual_seed(offset_seed(0))
    sbn = SigmoidBeliefNet(6, 3 if num_layers == 1 else 2, num_layers=num_layers)
    with torch.no_grad():
        sbn.prior_logits.normal_()
    x = _binary(5, 6)
    exact = _exact_log_marginal(sbn, x).detach()
    log_w = log_importance_weights(sbn.model, sbn.guide, x, num_samples=4000)
    estimate = log_w.logsumexp(0) - math.log(4000)
    # delta method: sd of log(mean w) is sd(w) / (mean(w) sqrt(K)); the bias is O(1/K)
    w = (log_w - log_w.max(0).values).exp()
    se = w.std(0) / (w.mean(0) * math.sqrt(4000))
    assert ((estimate - exact).abs() < 4 * se + 1e-3).all(), (estimate - exact, se)


def test_vectorized_particles_and_subsample_scale():
    sbn = SigmoidBeliefNet(8, 4, num_layers=2, num_data=100)
    x, idx = _binary(5, 8), torch.tensor([3, 50, 7, 99, 0])
    with pyro.plate("particles", 3, dim=-2):
        tr = poutine.trace(sbn.guide).get_trace(x, idx)
    assert tr.nodes["z2"]["value"].shape == (3, 5, 4)
    assert tr.nodes["z1"]["scale"] == pytest.approx(20.0)
    assert torch.equal(tr.nodes["data"]["value"], idx)
    # without num_data the indices only label the rows: no scaling
    sbn.num_data = None
    tr = poutine.trace(sbn.guide).get_trace(x, idx)
    assert tr.nodes["z1"]["scale"] == 1.0


def test_conveniences():
    sbn = SigmoidBeliefNet(10, 4, num_layers=3)
    x = _binary(6, 10)
    probs = sbn.encode(x)
    assert probs.shape == (6, 4) and ((probs > 0) & (probs < 1)).all()
    assert sbn.reconstruct(x).shape == (6, 10)
    samples = sbn.generate(7)
    assert samples.shape == (7, 10) and ((samples > 0) & (samples < 1)).all()


def test_bernoulli_vae_of_seed_001():
    vae = BernoulliVAE(64)
    assert vae.latent_sites == ("z",) and vae.latent_dim == 20
    assert [m.out_features for m in vae.encoders[0] if isinstance(m, nn.Linear)] == [400, 20]
    assert "prior_logits" in dict(vae.named_buffers())  # fixed uniform prior
    x = _binary(3, 64)
    tr = poutine.trace(vae.guide).get_trace(x)
    assert tr.nodes["z"]["value"].shape == (3, 20)
    loss = TraceNVIL_ELBO(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())


def test_non_binary_observations_are_an_error():
    sbn = SigmoidBeliefNet(4, 2)
    x = torch.full((3, 4), 0.5)
    with pytest.raises(ValueError, match="binary"):
        sbn.check_data(x)
    with pytest.raises(ValueError, match="binary"):
        TraceNVIL_ELBO(max_plate_nesting=1).loss(sbn.model, sbn.guide, x)
    # other likelihoods take real-valued data
    gaussian = SigmoidBeliefNet(4, 2, likelihood=GaussianLikelihood())
    gaussian.check_data(torch.randn(3, 4))
    assert math.isfinite(
        TraceNVIL_ELBO(max_plate_nesting=1).loss(gaussian.model, gaussian.guide, torch.randn(3, 4))
    )


def test_bad_configuration():
    with pytest.raises(ValueError, match="num_layers"):
        SigmoidBeliefNet(4, 2, num_layers=4)
    with pytest.raises(ValueError, match="latent_dim"):
        SigmoidBeliefNet(4, 0)
    with pytest.raises(ValueError, match="activation"):
        SigmoidBeliefNet(4, 2, depth=1, activation="swish")
    sbn = SigmoidBeliefNet(4, 2)
    with pytest.raises(ValueError, match="one dataset index per row"):
        sbn.guide(_binary(3, 4), torch.tensor([0, 1]))
