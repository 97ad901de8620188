"""AIS against PPCA's exact log-likelihood.

Tolerances. With ``C`` chains and log weights of standard deviation ``s`` (measured), the
delta method gives ``E[L_hat] ~= log p(x) - s^2 / (2C)`` and ``sd(L_hat) ~= s / sqrt(C)``
(valid for ``s`` of order 1, which the tests also assert: prior importance sampling on
these models has ``s`` near 100). Each datapoint must lie within 4 standard errors of
the bias-corrected exact value, the pooled mean within 4 pooled standard errors; the
sample sd itself is checked against its bound allowing 4 of its own standard errors.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import exact_log_likelihood, linear_gaussian_vae, sample_data
from seeding import offset_seed

from pyro_lvm.infer import AISResult, ais_log_likelihood, annealed_importance_sampling
from pyro_lvm.infer.ais import ais_schedule
from pyro_lvm.models import VAE, GaussianLikelihood


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: threads only add contention (conftest restores the count)
    torch.set_num_threads(1)


def _check_against_exact(result: AISResult, exact: torch.Tensor, max_sd: float) -> None:
    num_chains = result.log_weights.shape[0]
    sd = result.log_weights.std(0)
    # "the annealing works" is a claim about the true sd (< max_sd, where the delta method
    # holds); the sample sd of C near-Gaussian log weights has relative standard error
    # 1 / sqrt(2 (C - 1)), so the estimate may exceed max_sd by 4 of those
    sd_limit = max_sd * (1 + 4 / math.sqrt(2 * (num_chains - 1)))
    assert (sd < sd_limit).all(), f"log-weight sd {sd.tolist()}: the annealing is not working"
    se = sd / math.sqrt(num_chains)
    err = result.log_likelihood - (exact - sd**2 / (2 * num_chains))
    assert (err.abs() < 4 * se).all(), f"errors {err.tolist()} vs 4 se {(4 * se).tolist()}"
    pooled_se = se.pow(2).sum().sqrt() / len(se)
    assert err.mean().abs() < 4 * pooled_se


def test_ais_matches_ppca_exact(float64):
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(seed=0)
    x = sample_data(vae, 6, seed=10)
    result = annealed_importance_sampling(vae.model, x, num_steps=500, num_chains=16)
    assert result.log_likelihood.shape == (6,)
    assert result.log_weights.shape == (16, 6)
    _check_against_exact(result, exact_log_likelihood(vae, x), max_sd=1.5)


@pytest.mark.slow
def test_ais_matches_ppca_exact_long(float64):
    torch.manual_seed(offset_seed(1))
    vae = linear_gaussian_vae(data_dim=20, latent_dim=5, sigma=0.2, seed=1)
    x = sample_data(vae, 10, seed=11)
    result = annealed_importance_sampling(vae.model, x, num_steps=5000, num_chains=32)
    _check_against_exact(result, exact_log_likelihood(vae, x), max_sd=1.2)


def test_ais_few_steps_is_below_exact_on_average(float64):
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(seed=0)
    x = sample_data(vae, 20, seed=12)
    err = ais_log_likelihood(vae.model, x, num_steps=10, num_chains=4) - exact_log_likelihood(
        vae, x
    )
    # the bound is stochastic: single datapoints may exceed log p(x), the mean may not
    assert err.mean() < 0
    # more annealing steps tighten it
    err_more = ais_log_likelihood(
        vae.model, x, num_steps=100, num_chains=4
    ) - exact_log_likelihood(vae, x)
    assert err.mean() < err_more.mean() < 0


@pytest.mark.parametrize("num_steps, num_leapfrog", [(1, 1), (20, 1), (20, 3)])
def test_ais_weights_are_unbiased(float64, num_steps, num_leapfrog):
    # 1-D model: exp(log w) / p(x) must average to 1 (Neal 2001), also with step-size
    # adaptation, which only the discarded tuning chains drive
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(data_dim=1, latent_dim=1, sigma=0.5, seed=3)
    x = torch.tensor([[-2.0], [0.3], [2.5]])
    num_chains = 4000
    result = annealed_importance_sampling(
        vae.model,
        x,
        num_steps=num_steps,
        num_chains=num_chains,
        step_size=0.5,
        num_leapfrog=num_leapfrog,
    )
    ratio = (result.log_weights - exact_log_likelihood(vae, x)).exp()
    se = ratio.std(0) / math.sqrt(num_chains)
    assert ((ratio.mean(0) - 1).abs() < 4 * se).all(), (ratio.mean(0), se)


def test_ais_with_hmc_transitions_matches_ppca_exact(float64):
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(seed=0)
    x = sample_data(vae, 6, seed=10)
    result = annealed_importance_sampling(
        vae.model, x, num_steps=400, num_chains=32, num_leapfrog=3, target_accept_prob=0.65
    )
    assert ((result.accept_rate > 0.5) & (result.accept_rate < 0.8)).all()
    _check_against_exact(result, exact_log_likelihood(vae, x), max_sd=1.5)


def test_ais_step_size_adaptation_tracks_target(float64):
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(seed=0)
    x = sample_data(vae, 4, seed=13)
    adapted = annealed_importance_sampling(vae.model, x, num_steps=300, num_chains=8)
    assert ((adapted.accept_rate > 0.45) & (adapted.accept_rate < 0.7)).all()
    fixed = annealed_importance_sampling(
        vae.model, x, num_steps=300, num_chains=8, step_size=1.0, adapt_step_size=False
    )
    assert (fixed.step_size == 1.0).all()
    assert (fixed.accept_rate < 0.1).all()
    exact = exact_log_likelihood(vae, x)
    assert (exact - fixed.log_likelihood).mean() > (exact - adapted.log_likelihood).mean()


def test_ais_multiple_latent_sites(float64):
    # z = (z1, z2) split over two sites: the packing must recover the PPCA likelihood
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(data_dim=6, latent_dim=3, seed=4)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(x.shape[0]), 1.0))
            z = torch.cat([z1, z2.unsqueeze(-1)], -1)
            pyro.sample("x", vae.decode(z), obs=x)

    x = sample_data(vae, 4, seed=14)
    result = annealed_importance_sampling(
        model, x, num_steps=500, num_chains=16, latent_site=["z1", "z2"]
    )
    _check_against_exact(result, exact_log_likelihood(vae, x), max_sd=1.5)


def test_ais_runs_on_a_nonlinear_vae():
    torch.manual_seed(offset_seed(0))
    vae = VAE(5, 2, hidden_dim=8, depth=1, likelihood=GaussianLikelihood())
    x = torch.randn(7, 5)
    ll = ais_log_likelihood(vae.model, x, num_steps=5, num_chains=3, schedule="linear")
    assert ll.shape == (7,) and torch.isfinite(ll).all()
    with torch.no_grad():  # gradients w.r.t. z are enabled internally
        ll = ais_log_likelihood(vae.model, x, num_steps=3, num_chains=2, schedule=[0, 0.5, 1])
    assert ll.shape == (7,) and not ll.requires_grad


def test_ais_schedule():
    for kind in ("sigmoid", "linear"):
        betas = ais_schedule(50, kind)
        assert betas.shape == (51,) and betas[0] == 0 and betas[-1] == 1
        assert (betas.diff() > 0).all()
    assert torch.allclose(
        ais_schedule(4, "linear"), torch.tensor([0, 0.25, 0.5, 0.75, 1.0]).double()
    )
    sigmoid = ais_schedule(100)
    # the sigmoid schedule takes smaller steps at both ends than in the middle
    assert sigmoid.diff()[0] < sigmoid.diff()[50] and sigmoid.diff()[-1] < sigmoid.diff()[50]


def _discrete_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(x.shape[0], 2)).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def _positive_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.LogNormal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def test_ais_on_a_positive_latent_is_exact_through_the_log_transform(float64):
    """Gamma-Poisson: z_i ~ Gamma(a, b), x_ij | z_i ~ Poisson(z_i) (3 counts per row), so
    p(x_i) = prod_j 1/x_ij! * b^a / Gamma(a) * Gamma(a + S_i) / (b + 3)^(a + S_i) with
    S_i the row sum. AIS runs in the unconstrained space (log z) with the Jacobian."""
    a, b = 3.0, 2.0

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(a, b).expand([x.shape[0]]))
            rate = z.unsqueeze(-1).expand(z.shape + x.shape[-1:])
            pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)

    x = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 2.0], [0.0, 0.0, 0.0], [7.0, 5.0, 9.0]])
    s = x.sum(-1)
    exact = (
        -torch.lgamma(x + 1).sum(-1)
        + a * math.log(b)
        - math.lgamma(a)
        + torch.lgamma(a + s)
        - (a + s) * math.log(b + 3)
    )
    torch.manual_seed(offset_seed(4))
    result = annealed_importance_sampling(model, x, num_steps=300, num_chains=16)
    _check_against_exact(result, exact, max_sd=1.5)


def _global_model(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


@pytest.mark.parametrize(
    "model, kwargs, match",
    [
        (_discrete_model, {}, "is discrete"),
        (_global_model, {}, "outside the data plate"),
        (linear_gaussian_vae(data_dim=2, latent_dim=2).model, {"latent_site": "w"}, "not found"),
        (_discrete_model, {"num_chains": 0}, "num_chains"),
        (_discrete_model, {"step_size": 0.0}, "step_size"),
        (_discrete_model, {"num_tuning_chains": 0}, "num_tuning_chains"),
        (_discrete_model, {"target_accept_prob": 1.0}, "target_accept_prob"),
        (linear_gaussian_vae(data_dim=2, latent_dim=2).model, {"schedule": "cosine"}, "schedule"),
        (linear_gaussian_vae(data_dim=2, latent_dim=2).model, {"schedule": [0, 0.7]}, "0 to 1"),
        (linear_gaussian_vae(data_dim=2, latent_dim=2).model, {"num_steps": 0}, "num_steps"),
        (_discrete_model, {"num_leapfrog": 0}, "num_leapfrog"),
    ],
)
def test_ais_bad_input(model, kwargs, match):
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=match) as info:
        ais_log_likelihood(model, x, **{"num_steps": 2, **kwargs})
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_ais_agrees_with_long_iwae_on_a_trained_vae():
    # a nonlinear decoder has no exact answer; two estimators of the same log p(x) with
    # independent errors must agree within their combined standard errors
    from sklearn.datasets import load_digits

    from pyro_lvm.infer import LangevinProposalGuide, ModuleSVI, log_importance_weights

    torch.manual_seed(offset_seed(0))
    data = (torch.tensor(load_digits().data, dtype=torch.float32) / 16 > 0.5).float()
    vae = VAE(64, 4, hidden_dim=64, depth=1)
    svi = ModuleSVI(vae.model, vae.guide, torch.optim.Adam(vae.parameters(), lr=3e-3))
    for _ in range(20):
        for batch in data[:1500][torch.randperm(1500)].split(100):
            svi.step(batch)
    x = data[1500:1520]
    ais = annealed_importance_sampling(vae.model, x, num_steps=2000, num_chains=16)
    se_ais = ais.log_weights.std(0) / 4
    guide = LangevinProposalGuide(vae.model, vae.encode, 200)
    with torch.no_grad():
        log_w = log_importance_weights(vae.model, guide, x, num_samples=5000, chunk_size=1000)
    iwae = log_w.logsumexp(0) - math.log(5000)
    se_iwae = (log_w - iwae).exp().std(0) / math.sqrt(5000)
    se = (se_ais**2 + se_iwae**2).sqrt()
    diff = ais.log_likelihood - iwae
    assert (diff.abs() < 4 * se).all(), (diff, se)
    assert diff.mean().abs() < 4 * se.pow(2).sum().sqrt() / len(se)


def test_annealed_potential_gradient_is_exact(float64):
    # one decoder backward per evaluation: the potential's gradient is assembled from the
    # prior's and the likelihood's, and must equal autograd of the potential itself
    from pyro_lvm.infer.ais import annealed_potential
    from pyro_lvm.infer.mcmc import potential_and_grad
    from pyro_lvm.infer.sites import find_latents, log_densities

    torch.manual_seed(offset_seed(0))
    vae = VAE(6, 3, hidden_dim=8, depth=2, likelihood=GaussianLikelihood())
    x = torch.randn(5, 6)
    spec = find_latents(vae.model, x)
    z = torch.randn(4, 5, 3)
    beta = 0.37
    evaluated = {}
    value, grad = potential_and_grad(annealed_potential(vae.model, spec, beta, evaluated, x), z)
    z_ref = z.clone().requires_grad_(True)
    log_prior, log_lik = log_densities(vae.model, spec, z_ref, x)
    ref = -(log_prior + beta * log_lik)
    (ref_grad,) = torch.autograd.grad(ref.sum(), z_ref, retain_graph=True)
    (lik_grad,) = torch.autograd.grad(log_lik.sum(), z_ref)
    assert torch.equal(value, ref.detach())
    assert torch.allclose(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(evaluated["log_lik"], log_lik.detach())
    assert torch.allclose(evaluated["grad"], lik_grad, rtol=1e-12, atol=1e-12)
