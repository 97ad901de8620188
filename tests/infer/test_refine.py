"""Per-datapoint MALA refinement and Langevin-fitted proposals on a linear-Gaussian model.

Moment tolerances: ``C`` independent chains per datapoint; each chain's post-warmup
average is one draw of the estimator, so the Monte Carlo standard error of the pooled
average is the spread of the chain averages over ``sqrt(C)`` (autocorrelation included).
All ``2 * B * Z`` checks must lie within 4.5 standard errors (two-sided, Bonferroni over
24 checks: false-alarm rate below 2e-4).
"""

from __future__ import annotations

import math

import pytest
import torch
from linear_gaussian import exact_log_likelihood, exact_posterior, linear_gaussian_vae, sample_data
from seeding import offset_seed

from pyro_lvm.infer import (
    GaussianProposal,
    LangevinProposalGuide,
    fit_langevin_proposal,
    iwae_log_likelihood,
    log_importance_weights,
    refine_latents,
)
from pyro_lvm.infer.sites import find_latents


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_refined_chains_match_exact_posterior(float64):
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(seed=0)
    x = sample_data(vae, 4, seed=20)
    mean, cov = exact_posterior(vae, x)
    num_chains = 20
    z_init = torch.zeros(num_chains, 4, 3)  # far from the posterior: warmup must get there
    z, info = refine_latents(vae.model, x, z_init, 1000, return_samples=True)
    assert z.shape == (num_chains, 4, 3)
    assert info.samples.shape == (500, num_chains, 4, 3)
    assert ((info.accept_rate > 0.4) & (info.accept_rate < 0.75)).all()
    chain_means = info.samples.mean(0)  # (C, B, Z)
    se = chain_means.std(0) / math.sqrt(num_chains)
    assert ((chain_means.mean(0) - mean).abs() < 4.5 * se).all()
    chain_sq = ((info.samples - mean) ** 2).mean(0)
    se_sq = chain_sq.std(0) / math.sqrt(num_chains)
    assert ((chain_sq.mean(0) - cov.diagonal()).abs() < 4.5 * se_sq).all()


def test_ula_large_step_is_biased(float64):
    # ULA on a Gaussian target with step eta inflates the variance (by 1/(1 - eta/sigma^2/2)
    # per eigen-direction); MALA at the same step does not
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(seed=0)
    x = sample_data(vae, 2, seed=21)
    _, cov = exact_posterior(vae, x)
    eta = 0.5 * torch.linalg.eigvalsh(cov).min().item()
    z0 = exact_posterior(vae, x)[0].expand(20, 2, 3)
    kw = dict(step_size=eta, adapt_step_size=False, return_samples=True)
    # along the eigenvector of the smallest posterior variance lam, ULA's stationary
    # variance is lam / (1 - eta / (2 lam)) = 4/3 lam at eta = lam / 2; MALA's is lam.
    # Each (chain, datapoint) pair gives an independent variance estimate after burn-in;
    # their spread gives the standard error of the mean ratio.
    evals, evecs = torch.linalg.eigh(cov)
    lam, v = evals[0], evecs[:, 0]

    def ratio(samples):  # samples: (steps, chains, data, latent)
        proj = samples[100:] @ v
        per_chain = proj.var(0) / lam
        return per_chain.mean(), per_chain.std() / per_chain.numel() ** 0.5

    _, ula = refine_latents(vae.model, x, z0, 600, mh=False, **kw)
    r_ula, se_ula = ratio(ula.samples)
    assert abs(r_ula - 4 / 3) < 4 * se_ula, (r_ula, se_ula)
    _, mala = refine_latents(vae.model, x, z0, 600, mh=True, **kw)
    r_mala, se_mala = ratio(mala.samples)
    assert abs(r_mala - 1) < 4 * se_mala, (r_mala, se_mala)
    assert r_ula - r_mala > 4 * (se_ula**2 + se_mala**2) ** 0.5  # the bias is detected


def test_iwae_with_fitted_proposal_is_tight_and_below_exact(float64):
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(seed=0)
    x = sample_data(vae, 5, seed=22)
    exact = exact_log_likelihood(vae, x)
    mean, _ = exact_posterior(vae, x)
    proposal = fit_langevin_proposal(vae.model, x, mean + 0.3, 100)
    assert isinstance(proposal, GaussianProposal)
    log_w = torch.stack(
        [
            iwae_log_likelihood(vae.model, proposal, x, num_samples=1000, chunk_size=250)
            for _ in range(4)
        ]
    )
    # the bound holds in expectation: over 4 repeats, no datapoint above exact + 4 se
    se = log_w.std(0) / 2 + 1e-6
    assert (log_w.mean(0) <= exact + 4 * se).all()
    # and the fitted Gaussian is close to the posterior: within 0.05 nats
    assert ((exact - log_w.mean(0)) < 0.05).all()


def test_langevin_proposal_guide_inside_importance_evaluator(float64):
    torch.manual_seed(offset_seed(0))
    vae = linear_gaussian_vae(seed=0)
    x = sample_data(vae, 5, seed=23)
    guide = LangevinProposalGuide(vae.model, vae.encode, 60)
    num_samples = 500
    with torch.no_grad():  # as in the evaluator: the fit enables gradients itself
        log_w = log_importance_weights(vae.model, guide, x, num_samples=num_samples)
    ll = log_w.logsumexp(0) - math.log(num_samples)
    # delta method: sd of the log of the mean weight = sd(w / mean w) / sqrt(K)
    se = (log_w - ll).exp().std(0) / math.sqrt(num_samples)
    # the delta-method standard error is trustworthy where its own second-order term
    # se^2 / 2 is negligible against it: se <= 0.1 (0.005 nats); test the points where it
    # holds, and require that a good proposal makes most points qualify
    valid = se < 0.1
    assert valid.float().mean() >= 0.6, se
    assert ((ll - exact_log_likelihood(vae, x)).abs() < 4 * se)[valid].all()
    # fitted once for the 5 chunks of that batch
    first = guide.proposal(x)
    assert guide.proposal(x) is first
    assert guide.proposal(x.clone()) is not first


def test_refine_bad_input():
    vae = linear_gaussian_vae(data_dim=4, latent_dim=2)
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="z_init must have shape"):
        refine_latents(vae.model, x, torch.zeros(3, 5), 10)
    with pytest.raises(ValueError, match="num_steps"):
        refine_latents(vae.model, x, torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match="step_size"):
        refine_latents(vae.model, x, torch.zeros(3, 2), 5, step_size=-1.0)
    with pytest.raises(ValueError, match="num_warmup"):
        refine_latents(vae.model, x, torch.zeros(3, 2), 5, num_warmup=5)
    with pytest.raises(ValueError, match="scale_inflation"):
        fit_langevin_proposal(vae.model, x, torch.zeros(3, 2), 10, scale_inflation=0.5)
    spec = find_latents(vae.model, x)
    proposal = GaussianProposal(spec, torch.zeros(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="fitted to 3 datapoints"):
        proposal(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        LangevinProposalGuide(vae.model, vae.encode, 1)


def test_a_model_written_for_one_draw_is_refined_chain_by_chain(float64):
    """``.expand`` to the batch's rows (as written for one draw) cannot take the chains'
    dimension: refinement evaluates it one chain at a time and gets the same chains as
    the same model written with broadcasting."""
    import written_models as wm

    A, c, _ = wm.params()
    x = wm.data(4, seed=offset_seed(1))
    z_init = torch.zeros(3, 4, wm.L)
    chains = {}
    for model in (wm.model_plate, wm.model_expand):
        torch.manual_seed(offset_seed(2))
        z, _ = refine_latents(lambda x, m=model: m(x, A, c), x, z_init, 20, step_size=0.05)
        chains[model.__name__] = z
    torch.testing.assert_close(chains["model_expand"], chains["model_plate"])
    assert not torch.equal(chains["model_plate"], z_init)  # the chains moved
