"""The Hoffman (2017) baseline: gradient routing, learning, checkpoints, bad input."""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import exact_log_likelihood, linear_gaussian_vae, sample_data
from pyro import poutine
from pyro.distributions.testing.fakes import NonreparameterizedNormal
from seeding import offset_seed

from pyro_lvm.infer import DLGM


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _elbo_grads(vae, x, seed):
    """Gradients of minus the single-sample ELBO drawn with ``seed``."""
    pyro.set_rng_seed(offset_seed(seed))
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    loss = guide_trace.log_prob_sum() - model_trace.log_prob_sum()
    params = list(vae.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {id(p): g for p, g in zip(params, grads)}


def test_gradient_routing(float64):
    # with a vanishing Langevin step, z_T = z_0: the decoder's gradient must be the joint's
    # at z_0, which equals the ELBO's decoder gradient (log q does not depend on it) -- once,
    # not twice -- and the encoder's gradient the ELBO's encoder gradient
    vae = linear_gaussian_vae(data_dim=5, latent_dim=2, seed=0)
    x = sample_data(vae, 7, seed=1)
    dlgm = DLGM(vae.model, vae.guide, torch.optim.SGD(vae.parameters(), lr=0.0), step_size=1e-14)
    dlgm.step(x)  # finds the latent sites and the encoder's parameters
    pyro.set_rng_seed(offset_seed(5))
    loss = dlgm.step(x)
    expected = _elbo_grads(vae, x, seed=5)
    for p in vae.parameters():
        assert torch.allclose(p.grad, expected[id(p)], rtol=1e-5, atol=1e-8)
    encoder_ids = {id(p) for p in vae.encoder.parameters()}
    assert {id(p) for p in dlgm._guide_params} == encoder_ids
    assert isinstance(loss, float)


def test_decoder_trains_on_refined_latents(float64):
    # a large ULA step moves z_T away from z_0: the decoder's gradient then differs from
    # the ELBO's, while the encoder's does not
    vae = linear_gaussian_vae(data_dim=5, latent_dim=2, seed=0)
    x = sample_data(vae, 7, seed=1)
    dlgm = DLGM(vae.model, vae.guide, torch.optim.SGD(vae.parameters(), lr=0.0), step_size=0.01)
    dlgm.step(x)
    pyro.set_rng_seed(offset_seed(5))
    dlgm.step(x)
    expected = _elbo_grads(vae, x, seed=5)
    for p in vae.encoder.parameters():
        assert torch.allclose(p.grad, expected[id(p)], rtol=1e-5, atol=1e-8)
    w = vae.decoder.weight
    assert not torch.allclose(w.grad, expected[id(w)], rtol=1e-2)


def test_dlgm_learns_linear_gaussian(float64):
    torch.manual_seed(offset_seed(0))
    truth = linear_gaussian_vae(data_dim=6, latent_dim=2, sigma=0.3, seed=0)
    train, test = sample_data(truth, 400, seed=1), sample_data(truth, 200, seed=2)
    vae = linear_gaussian_vae(data_dim=6, latent_dim=2, sigma=0.3, seed=7)
    dlgm = DLGM(
        vae.model,
        vae.guide,
        torch.optim.Adam(vae.parameters(), lr=0.05),
        mh=True,
        adapt_step_size=True,
    )
    before = exact_log_likelihood(vae, test).mean()
    for _ in range(50):
        for batch in train.split(100):
            dlgm.step(batch)
    after = exact_log_likelihood(vae, test).mean()
    best = exact_log_likelihood(truth, test).mean()
    assert after > before + 10
    # within 1 nat of the true model's test likelihood after 200 steps (measured: 0.5; the
    # fitted model's estimation error on 400 points is ~0.05 nats)
    assert after > best - 1.0, (before, after, best)
    metrics = dlgm.metrics()
    assert set(metrics) == {"accept_rate", "step_size"}
    assert 0.3 < metrics["accept_rate"] < 0.9
    assert dlgm.evaluate_loss(test) / len(test) < -before.item()


def test_state_dict_roundtrip(float64):
    def make(vae):
        opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
        return DLGM(vae.model, vae.guide, opt, mh=True, adapt_step_size=True)

    vae_a = linear_gaussian_vae(data_dim=5, latent_dim=2, seed=0)
    x = sample_data(vae_a, 20, seed=1)
    a = make(vae_a)
    for _ in range(5):
        a.step(x)
    vae_b = copy.deepcopy(vae_a)
    b = make(vae_b)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.metrics() == a.metrics() and b.step_size == a.step_size
    pyro.set_rng_seed(offset_seed(3))
    loss_a = [a.step(x) for _ in range(3)]
    pyro.set_rng_seed(offset_seed(3))
    loss_b = [b.step(x) for _ in range(3)]
    assert loss_a == loss_b
    for pa, pb in zip(vae_a.parameters(), vae_b.parameters()):
        assert torch.equal(pa, pb)


def test_dlgm_bad_input():
    vae = linear_gaussian_vae(data_dim=4, latent_dim=2)
    opt = torch.optim.SGD(vae.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="num_steps"):
        DLGM(vae.model, vae.guide, opt, num_steps=0)
    with pytest.raises(ValueError, match="step_size"):
        DLGM(vae.model, vae.guide, opt, step_size=0.0)
    with pytest.raises(ValueError, match="target_accept_prob"):
        DLGM(vae.model, vae.guide, opt, target_accept_prob=1.5)

    def score_guide(x):
        loc, scale = vae.encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", NonreparameterizedNormal(loc, scale).to_event(1))

    with pytest.raises(ValueError, match="not reparameterizable"):
        DLGM(vae.model, score_guide, opt).step(torch.zeros(3, 4))
    decoder_only = torch.optim.SGD(vae.decoder.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="none of the optimizer's parameters"):
        DLGM(vae.model, vae.guide, decoder_only).step(torch.zeros(3, 4))

    def discrete_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(torch.full((x.shape[0], 2), 0.5)).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="discrete"):
        DLGM(discrete_model, vae.guide, opt).step(torch.zeros(3, 1))
