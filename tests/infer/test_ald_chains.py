"""AmortizedLangevin follows Pyro's MCMC conventions: MCMC.run leaves the user's modules
as they were, several chains start dispersed and are independent, and initial_params may
be keyed by the latent site (the final layer's weight is solved to reproduce them)."""

import warnings

import pytest
import torch
from pyro.infer import MCMC
from pyro.infer.mcmc import api
from pyro.ops.stats import split_gelman_rubin
from seeding import offset_seed
from test_amortized_langevin import LATENT, N, check_posterior, make_problem

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
    torch.testing.assert_close(kernel.latents(), z0)
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
