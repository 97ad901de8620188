"""AmortizedLangevin follows Pyro's MCMC conventions: MCMC.run leaves the user's modules
as they were, several chains start dispersed and are independent, and initial_params may
be keyed by the latent site (the final layer's weight is solved to reproduce them)."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from ald_problem import LATENT, N, Z, check_posterior, make_problem
from pyro.infer import MCMC
from pyro.infer.mcmc import api
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from seeding import offset_seed

from pyro_lvm.infer import AmortizedLangevin


def test_two_chains_are_independent_dispersed_and_leave_the_encoder_unchanged(
    float64, monkeypatch
):
    torch.manual_seed(offset_seed(0))
    x, model, encoder, mean, cov = make_problem()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    # one CPU: Pyro draws the chains one after the other in this process
    monkeypatch.setattr(api.mp, "cpu_count", lambda: 1)
    kernel = AmortizedLangevin(model, encoder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="num_chains=2 is more than available_cpu")
        mcmc = MCMC(kernel, num_samples=800, warmup_steps=200, num_chains=2, disable_progbar=True)
        mcmc.run(x)
    after = encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    samples = mcmc.get_samples(group_by_chain=True)["z"]  # (2, 800, N, LATENT)
    assert samples.shape == (2, 800, N, LATENT)
    assert (samples[0, 0] - samples[1, 0]).abs().min() > 1e-6  # different starts
    r_hat = split_gelman_rubin(samples, chain_dim=0, sample_dim=1)
    assert (r_hat < 1.1).all(), r_hat
    for chain in samples:
        check_posterior(chain, mean, cov)


def test_initial_params_keyed_by_the_latent_site(float64):
    x, model, encoder, *_ = make_problem()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    z0 = torch.randn(N, LATENT)
    kernel = AmortizedLangevin(model, encoder, step_size=1e-3)
    kernel.initial_params = {"z": z0}
    kernel.setup(0, x)
    torch.testing.assert_close(kernel.initial_params["z"], z0)
    kernel.cleanup()
    after = encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_initial_params_errors_are_one_line(float64):
    x, model, encoder, *_ = make_problem()
    kernel = AmortizedLangevin(model, encoder, step_size=1e-3)
    with pytest.raises(ValueError, match="keyed by the latent site 'z'") as err:
        kernel.initial_params = {"w": torch.zeros(1)}
    assert "\n" not in str(err.value)
    # two features cannot reproduce arbitrary latents of three rows
    x, model, encoder, *_ = make_problem(orthonormal=False, width=2)
    kernel = AmortizedLangevin(model, encoder, step_size=1e-3)
    kernel.initial_params = {"z": torch.randn(N, LATENT)}
    with pytest.raises(ValueError, match="cannot reproduce") as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel.setup(0, x)
    assert "\n" not in str(err.value)


class _Head(torch.nn.Module):
    """A custom (non-Sequential) encoder: trunk, the chain's Linear, then ``out``."""

    def __init__(self, out=None):
        super().__init__()
        self.trunk = torch.nn.Linear(4, 5)
        self.head = torch.nn.Linear(5, LATENT)
        self.out = out

    def forward(self, x):
        z = self.head(torch.tanh(self.trunk(x)))
        return z if self.out is None else self.out(z)


def _positive_model(x):
    with pyro.plate("data", x.shape[0]):
        rate = pyro.sample("z", dist.Gamma(2.0, 1.0).expand([x.shape[0], LATENT]).to_event(1))
        pyro.sample("x", dist.Poisson(rate.sum(-1, keepdim=True)).to_event(1), obs=x[:, :1])


def test_an_exp_head_is_refused_in_one_line():
    """exp after the chain's layer would sample the wrong law (no Jacobian): refused."""
    x = torch.poisson(torch.full((N, 4), 2.0))
    kernel = AmortizedLangevin(_positive_model, _Head(torch.exp), step_size=1e-3)
    with pytest.raises(ValueError, match="not affine in the chain parameters") as err:
        kernel.setup(0, x)
    assert "\n" not in str(err.value)
    kernel.cleanup()


def test_a_custom_affine_encoder_and_encoder_input(float64):
    """A non-Sequential encoder ending in the chain's Linear passes the affinity check;
    the data reach it from a keyword argument through encoder_input=."""
    x, model, *_ = make_problem()

    def keyword_model(*, data):
        model(data)

    encoder = _Head()
    kernel = AmortizedLangevin(
        keyword_model, encoder, step_size=1e-3, encoder_input=lambda *, data: data
    )
    mcmc = MCMC(kernel, num_samples=20, warmup_steps=5, disable_progbar=True)
    mcmc.run(data=x)
    assert mcmc.get_samples()["z"].shape == (20, N, LATENT)


def test_gamma_poisson_exact_posterior_through_the_log_transform(float64):
    """z_i ~ Gamma(a, b), x_ij ~ Poisson(z_i), j = 1..m: the posterior is
    Gamma(a + sum_j x_ij, b + m). The encoder outputs log z (Pyro's unconstrained space of
    a positive site); the potential carries the log-Jacobian and get_samples() returns z.
    Means and variances within Z Monte Carlo standard errors (ESS-based)."""
    a, b, m = 2.0, 1.0, 3
    gen = torch.Generator().manual_seed(offset_seed(11))
    x = torch.poisson(torch.full((N, m), 1.5), generator=gen)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(a, b).expand([x.shape[0], 1]).to_event(1))
            pyro.sample("x", dist.Poisson(z.expand(-1, m)).to_event(1), obs=x)

    # features g(x_i) = e_i (plain per-datapoint Langevin, the rank condition exactly):
    # the counts may repeat rows, so features computed from x could be rank-deficient
    encoder = torch.nn.Sequential(torch.nn.Linear(N, 1))
    kernel = AmortizedLangevin(model, encoder, encoder_input=lambda x: torch.eye(N))
    pyro.set_rng_seed(offset_seed(12))
    mcmc = MCMC(kernel, num_samples=2000, warmup_steps=300, disable_progbar=True)
    mcmc.run(x)
    z = mcmc.get_samples()["z"][..., 0]  # (S, N), positive
    assert (z > 0).all()
    shape, rate = a + x.sum(1), b + m
    mean, var = shape / rate, shape / rate**2
    for i in range(N):
        ess = effective_sample_size(z[None, :, i], 0, 1)
        assert abs(z[:, i].mean() - mean[i]) < Z * (var[i] / ess).sqrt(), i
        # Var[(z - m)^2] = mu4 - var^2 with the Gamma's mu4 = 3 var^2 (1 + 2 / shape)
        sq = (z[:, i] - mean[i]) ** 2
        ess_sq = effective_sample_size(sq[None], 0, 1)
        sd_sq = (var[i] ** 2 * (2 + 6 / shape[i])).sqrt()
        assert abs(sq.mean() - var[i]) < Z * sd_sq / ess_sq.sqrt(), i
