"""ALD on encoders and models as researchers write them: a ``(loc, scale)`` encoder in the
style of Pyro's VAE example, an affine transform after the head (re-run encoder,
preconditioned from its Jacobian), potentials that are not a function of the state,
flat (masked) latent coordinates, chains that do not mix, and Pyro's / ArviZ's MCMC
conventions. Exact answers from the PPCA problem of ``ald_problem``."""

import random
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from ald_problem import LATENT, D, N, check_posterior, make_problem
from pyro import poutine
from pyro.infer import MCMC
from seeding import offset_seed
from torch import nn

from pyro_lvm.infer import AmortizedLangevin
from pyro_lvm.infer.mcmc import to_inference_data
from pyro_lvm.infer.mcmc.checks import FlatPotentialWarning
from pyro_lvm.infer.mcmc.mixing import MixingWarning


class PyroStyleEncoder(nn.Module):
    """As in Pyro's ``examples/vae/vae.py``: ``fc1``, then ``fc21`` (loc) and ``fc22``
    (log scale) heads, returning ``(z_loc, z_scale)``."""

    def __init__(self, trunk: nn.Module, width: int):
        super().__init__()
        self.fc1 = trunk
        self.fc21 = nn.Linear(width, LATENT)
        self.fc22 = nn.Linear(width, LATENT)

    def forward(self, x):
        hidden = self.fc1(x)
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class ScaledHead(nn.Module):
    """A head followed by a fixed per-column affine map (a batch norm in eval mode)."""

    def __init__(self, trunk: nn.Module, width: int):
        super().__init__()
        self.trunk, self.head = trunk, nn.Linear(width, LATENT)
        self.register_buffer("scale", torch.tensor([2.0, 0.5]))
        self.register_buffer("shift", torch.tensor([0.3, -0.1]))

    def forward(self, x):
        return self.head(self.trunk(x)) * self.scale + self.shift


def _pyro_style(width=N):
    x, model, encoder, mean, cov = make_problem()
    enc = PyroStyleEncoder(encoder[0], width)
    with torch.no_grad():
        enc.fc21.weight.copy_(encoder[1].weight)
        enc.fc21.bias.copy_(encoder[1].bias)
    return x, model, enc, mean, cov


def test_a_loc_scale_encoder_as_written_samples_the_exact_posterior(float64):
    x, model, encoder, mean, cov = _pyro_style()
    kernel = AmortizedLangevin(model, encoder)
    mcmc = MCMC(kernel, num_samples=1200, warmup_steps=200, disable_progbar=True)
    mcmc.run(x)
    assert kernel.cache.spec.param_names == ("fc21.weight",)  # the loc head, found
    check_posterior(mcmc.get_samples()["z"], mean, cov)


def test_an_affine_transform_after_the_head_is_preconditioned_exactly(float64):
    x, model, encoder, mean, cov = make_problem()
    scaled = ScaledHead(encoder[0], N)
    kernel = AmortizedLangevin(model, scaled)
    mcmc = MCMC(kernel, num_samples=1200, warmup_steps=200, disable_progbar=True)
    mcmc.run(x)
    spec = kernel.cache.spec
    assert spec.heads is None and spec.param_names == ("head.weight",)  # re-run path
    check_posterior(mcmc.get_samples()["z"], mean, cov)


def test_dropout_in_the_decoder_is_refused_naming_the_layer():
    x, _, encoder, _, _ = make_problem()
    x, encoder = x.float(), encoder.float()

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(LATENT, D), nn.Dropout(0.5))

        def model(self, x):
            pyro.module("decoder", self)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], LATENT), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(self.net(z), 1.0).to_event(1), obs=x)

    decoder = Decoder()
    kernel = AmortizedLangevin(decoder.model, encoder)
    with pytest.raises(ValueError, match=r"changes between two evaluations.*net\.1 \(Dropout\)"):
        MCMC(kernel, num_samples=5, disable_progbar=True).run(x)
    decoder.eval()  # the fix the message names
    MCMC(AmortizedLangevin(decoder.model, encoder), num_samples=5, disable_progbar=True).run(x)


def test_python_randomness_in_the_model_is_refused():
    x, model, encoder, _, _ = make_problem()
    x, encoder = x.float(), encoder.float()
    rng = random.Random(0)

    def augmented(x):
        model(x * (1.0 + rng.random()))  # a fresh random scale at every call

    kernel = AmortizedLangevin(augmented, encoder)
    with pytest.raises(ValueError, match="random numbers drawn inside the model") as err:
        MCMC(kernel, num_samples=5, disable_progbar=True).run(x)
    assert "\n" not in str(err.value)


def test_masked_latent_coordinates_are_warned_about():
    x, _, encoder, _, _ = make_problem()
    x, encoder = x.float(), encoder.float()
    keep = torch.tensor([True, True, False])  # the last row is padding

    def model(x):
        with pyro.plate("data", x.shape[0]), poutine.mask(mask=keep):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    kernel = AmortizedLangevin(model, encoder)
    with pytest.warns(FlatPotentialWarning, match="2 of 6 coordinates of latent site 'z'"):
        MCMC(kernel, num_samples=5, disable_progbar=True).run(x)


class FixedFeatures(nn.Module):
    """Fixed features with a large common mode (as trained features have), then a head."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.register_buffer("g", features)
        self.head = nn.Linear(features.shape[1], LATENT)

    def forward(self, x):
        return self.head(self.g[: x.shape[0]])


def test_a_chain_that_barely_mixes_is_warned_about_and_preconditioning_fixes_it():
    """Plain ALD's step size is set by the features' common mode (G G^T's top eigenvalue
    is ~10^4 times its median here), so per-datapoint directions barely move: measured
    min ESS 2.6-3.3 of 1000 draws over 4 seeds; preconditioned 19-49 (threshold 5)."""
    gen = torch.Generator().manual_seed(offset_seed(40))
    n, width = 30, 48
    x = torch.randn(n, D, generator=gen)
    W = 0.3 * torch.randn(D, LATENT, generator=gen)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T, 1.0).to_event(1), obs=x)

    encoder = FixedFeatures(10.0 + torch.randn(n, width, generator=gen))
    for precondition in (None, 1e-3):
        kernel = AmortizedLangevin(model, encoder, precondition=precondition)
        mcmc = MCMC(kernel, num_samples=1000, warmup_steps=200, disable_progbar=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MixingWarning)
            mcmc.run(x)
        mixing = [str(w.message) for w in caught if issubclass(w.category, MixingWarning)]
        if precondition is None:
            assert mixing and "barely mixes" in mixing[0] and "\n" not in mixing[0]
        else:
            assert not mixing


def test_pyro_summary_diagnostics_and_arviz():
    x, model, encoder, _, _ = make_problem()
    x, encoder = x.float(), encoder.float()
    kernel = AmortizedLangevin(model, encoder)
    mcmc = MCMC(kernel, num_samples=30, warmup_steps=10, num_chains=1, disable_progbar=True)
    mcmc.run(x)
    diag = mcmc.diagnostics()
    assert "divergences" in diag and "acceptance rate" in diag
    assert set(diag["z"]) >= {"n_eff", "r_hat"}
    mcmc.summary()  # prints the table, as with NUTS
    with warnings.catch_warnings():
        # ArviZ 0.23 announces its 1.0 refactor on import (a FutureWarning of its own)
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing", category=FutureWarning)
        az = pytest.importorskip("arviz")
    data = az.from_pyro(mcmc)
    assert data.posterior["z"].shape == (1, 30, N, LATENT)
    assert "diverging" in data.sample_stats
    assert "x" in data.log_likelihood
    # the from_dict route (ArviZ 1.x has no from_pyro): the same groups and numbers
    ours = to_inference_data(mcmc)
    assert (ours.posterior["z"].values == data.posterior["z"].values).all()
    assert (ours.sample_stats["diverging"].values == data.sample_stats["diverging"].values).all()
    assert abs(ours.log_likelihood["x"].values - data.log_likelihood["x"].values).max() < 1e-4


def test_grey_levels_for_a_bernoulli_built_without_validation():
    """Pyro's VAE example feeds grey levels to ``Bernoulli(..., validate_args=False)``: the
    author's choice, sampled as written; values outside [0, 1] are still refused."""
    _, _, encoder, _, _ = make_problem()
    encoder = encoder.float()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], LATENT), 1.0).to_event(1))
            probs = torch.sigmoid(z.sum(-1, keepdim=True)).expand(x.shape)
            pyro.sample("x", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=x)

    grey = torch.rand(N, D)
    MCMC(AmortizedLangevin(model, encoder), num_samples=5, disable_progbar=True).run(grey)
    with pytest.raises(ValueError, match="outside the support"):
        MCMC(AmortizedLangevin(model, encoder), num_samples=5, disable_progbar=True).run(3 * grey)


class TwoHeads(nn.Module):
    """Two sites from two heads, called in the order opposite to ``latent_site``'s."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(D, 8)
        self.head_b, self.head_a = nn.Linear(8, LATENT), nn.Linear(8, LATENT)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return {"b": self.head_b(h), "a": self.head_a(h)}


def test_the_mixing_summary_tracks_only_coordinates_the_potential_reaches():
    """Masked rows of site ``a`` random-walk freely (warned about once); the ESS tracking
    and the relative move leave them out, whatever the heads' order."""
    x, *_ = make_problem()
    x = x.float()
    rows = torch.tensor([True, False, False])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            with poutine.mask(mask=rows):
                a = pyro.sample("a", dist.Normal(torch.zeros(x.shape[0], LATENT), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(torch.zeros(x.shape[0], LATENT), 1.0).to_event(1))
            loc = torch.cat([a * rows[:, None], b], -1).sum(-1, keepdim=True)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x[:, :1])

    torch.manual_seed(offset_seed(3))
    kernel = AmortizedLangevin(model, TwoHeads(), latent_site=["a", "b"])
    with pytest.warns(FlatPotentialWarning, match="4 of 6 coordinates of latent site 'a'"):
        MCMC(kernel, num_samples=120, warmup_steps=20, disable_progbar=True).run(x)
    free_a = rows[:, None].expand(-1, LATENT).reshape(-1)
    where = torch.cat([free_a, torch.ones(N * LATENT, dtype=torch.bool)])  # a, then b
    assert where[kernel._track].all() and len(kernel._track) == int(where.sum())
