"""Pyro's own idioms train pyro_lvm's models: pyro.module registration, pyro.infer.SVI with
pyro.optim, and ModuleSVI / LAE with a PyroOptim or with Pyro params in the model."""

import copy
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from seeding import offset_seed

from pyro_lvm.infer import LAE, ModuleSVI
from pyro_lvm.models import MLP, VAE, GaussianLikelihood, SigmoidBeliefNet

DATA, LATENT = 6, 2


def data(n=96, seed=1):
    gen = torch.Generator().manual_seed(offset_seed(seed))
    z = torch.randn(n, LATENT, generator=gen)
    w = torch.randn(LATENT, DATA, generator=gen)
    return torch.tanh(z @ w) + 0.1 * torch.randn(n, DATA, generator=gen)


def make_vae(seed=0):
    torch.manual_seed(offset_seed(seed))
    return VAE(DATA, LATENT, hidden_dim=16, depth=1, likelihood=GaussianLikelihood())


def held_out_nelbo(vae, x, seed=5):
    torch.manual_seed(offset_seed(seed))
    loss = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        return loss.loss(vae.model, vae.guide, x) / x.shape[0]


def test_plain_pyro_svi_trains_the_ready_vae_like_module_svi():
    x = data()
    train, test = x[:64], x[64:]
    a, b = make_vae(), make_vae()
    before = copy.deepcopy(a.state_dict())
    start = held_out_nelbo(a, test)
    svi = SVI(a.model, a.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    module_svi = ModuleSVI(b.model, b.guide, torch.optim.Adam(b.parameters(), lr=1e-2))
    losses_a, losses_b = [], []
    for i in range(60):
        batch = train[(i % 4) * 16 : (i % 4 + 1) * 16]
        torch.manual_seed(offset_seed(100 + i))
        losses_a.append(svi.step(batch))
        torch.manual_seed(offset_seed(100 + i))
        losses_b.append(module_svi.step(batch))
    # every parameter moved, and the module itself holds the trained values
    moved = {k: not torch.equal(v, before[k]) for k, v in a.state_dict().items()}
    assert all(moved.values()), moved
    assert held_out_nelbo(a, test) < start - 0.5
    # the same steps as ModuleSVI with torch's Adam on the same random numbers
    assert losses_a == pytest.approx(losses_b, rel=1e-4, abs=1e-4)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_registration_uses_the_module_tensors_and_survives_a_second_instance():
    first, second = make_vae(0), make_vae(1)
    x = data(8)
    first.model(x)
    second.model(x)  # same names: the second model's own tensors replace the first's
    store = pyro.get_param_store()
    assert store["VAE$$$decoder.0.weight"] is second.decoder[0].weight
    assert len([k for k in store.keys() if k.startswith("VAE$$$")]) == len(
        list(second.parameters())
    )
    # state_dict checkpoints are unaffected by registration
    fresh = make_vae(2)
    fresh.load_state_dict(second.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), second.parameters()))


def test_frozen_parameters_are_not_registered_and_do_not_warn():
    vae = make_vae()
    vae.decoder[0].weight.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vae.model(data(4))
    assert "VAE$$$decoder.0.weight" not in pyro.get_param_store()


def test_module_svi_with_a_pyro_optim_matches_torch_adam():
    x = data(32)
    a, b = make_vae(), make_vae()
    b.pyro_name = "other"  # two same-class models side by side: distinct param store names
    pyro_svi = ModuleSVI(a.model, a.guide, pyro.optim.Adam({"lr": 1e-2}))
    torch_svi = ModuleSVI(b.model, b.guide, torch.optim.Adam(b.parameters(), lr=1e-2))
    for i in range(20):
        torch.manual_seed(offset_seed(10 + i))
        la = pyro_svi.step(x)
        torch.manual_seed(offset_seed(10 + i))
        lb = torch_svi.step(x)
        assert la == pytest.approx(lb, rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    assert set(pyro_svi.state_dict()["optim"]["pyro_optim"]) >= {"VAE$$$decoder.0.weight"}


def pyro_param_model(x):
    """A user's model with a Pyro param: z ~ N(0, 1), x ~ N(z + shift, 1)."""
    shift = pyro.param("shift", torch.zeros(()))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))
        pyro.sample("x", dist.Normal(z + shift, 1.0), obs=x)


def pyro_param_guide(x):
    loc = pyro.param("loc", torch.zeros(x.shape[0]))
    scale = pyro.param("scale", torch.ones(x.shape[0]), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, scale))


def test_module_svi_trains_pyro_params_like_pyro_svi():
    """A user's model written around pyro.param: ModuleSVI with a torch optimizer (the
    params join it as a new group) or with a PyroOptim takes pyro.infer.SVI's steps."""
    torch.manual_seed(offset_seed(0))
    x = 3.0 + torch.randn(50) * 2**0.5
    results = []
    for kind in ["svi", "torch", "pyro"]:
        pyro.clear_param_store()
        if kind == "svi":
            svi = SVI(
                pyro_param_model, pyro_param_guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO()
            )
        else:
            dummy = torch.nn.Linear(1, 1)  # a torch optimizer must start with some parameter
            optim = (
                torch.optim.Adam(dummy.parameters(), lr=0.05)
                if kind == "torch"
                else pyro.optim.Adam({"lr": 0.05})
            )
            svi = ModuleSVI(pyro_param_model, pyro_param_guide, optim)
        for i in range(30):
            torch.manual_seed(offset_seed(20 + i))
            svi.step(x)
        results.append({k: v.detach().clone() for k, v in pyro.get_param_store().items()})
    assert results[0]["shift"] > 0.5  # moved towards mean(x) = 3 from 0
    for other in results[1:]:
        for name, value in results[0].items():
            assert torch.allclose(other[name], value, atol=1e-6), name


def test_module_svi_resumes_with_pyro_params_in_a_torch_optimizer():
    torch.manual_seed(offset_seed(0))
    x = torch.randn(20) + 1.0

    def run(steps, state=None, params=None):
        pyro.clear_param_store()
        if params is not None:
            pyro.get_param_store().set_state(params)
        dummy = torch.nn.Linear(1, 1)
        svi = ModuleSVI(pyro_param_model, pyro_param_guide, torch.optim.Adam(dummy.parameters()))
        if state is not None:
            svi.load_state_dict(state)
        for i in range(steps):
            torch.manual_seed(offset_seed(50 + i))
            svi.step(x)
        return svi, copy.deepcopy(pyro.get_param_store().get_state())

    _, straight = run(10)
    svi, half = run(5)
    state = copy.deepcopy(svi.state_dict())
    assert len(state["optim"]["param_groups"]) == 2  # the Pyro params joined as a group
    # resume: same param values, optimizer state applied once the params are traced again
    pyro.clear_param_store()
    pyro.get_param_store().set_state(half)
    dummy = torch.nn.Linear(1, 1)
    resumed = ModuleSVI(pyro_param_model, pyro_param_guide, torch.optim.Adam(dummy.parameters()))
    resumed.load_state_dict(state)
    for i in range(5, 10):
        torch.manual_seed(offset_seed(50 + i))
        resumed.step(x)
    for name, value in straight["params"].items():
        assert torch.allclose(pyro.get_param_store().get_state()["params"][name], value), name


def test_module_svi_refuses_a_non_optimizer():
    vae = make_vae()
    with pytest.raises(TypeError, match="torch.optim.Optimizer or a pyro.optim.PyroOptim"):
        ModuleSVI(vae.model, vae.guide, "adam")


def test_sbn_trains_with_plain_svi():
    torch.manual_seed(offset_seed(0))
    sbn = SigmoidBeliefNet(DATA, 3)
    x = torch.bernoulli(torch.full((16, DATA), 0.3))
    from pyro.infer import TraceGraph_ELBO

    before = [p.detach().clone() for p in sbn.parameters()]
    svi = SVI(sbn.model, sbn.guide, pyro.optim.Adam({"lr": 1e-2}), TraceGraph_ELBO())
    for _ in range(3):
        svi.step(x)
    assert all(not torch.equal(p, q) for p, q in zip(sbn.parameters(), before))


def lae_model_with_param(x):
    """z ~ N(0, I), x ~ N(z W, 0.5^2) with a learned Pyro-param offset b."""
    offset = pyro.param("offset", torch.zeros(DATA))
    decoder = pyro.module("decoder", DECODER)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], LATENT), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(decoder(z) + offset, 0.5).to_event(1), obs=x)


DECODER = torch.nn.Linear(LATENT, DATA, bias=False)


@pytest.mark.parametrize("kind", ["torch", "pyro"])
def test_lae_trains_pyro_params_and_modules_but_not_the_chain(kind):
    torch.manual_seed(offset_seed(0))
    DECODER.reset_parameters()
    encoder = MLP(DATA, LATENT, hidden_dim=24, depth=1)
    x = data(16) + 2.0
    if kind == "torch":
        optim = torch.optim.Adam(encoder.parameters(), lr=0.05)
    else:
        optim = pyro.optim.Adam({"lr": 0.05})
    lae = LAE(lae_model_with_param, encoder, optim, step_size=1e-3, adapt_step_size=False)
    trunk = encoder[0].weight.detach().clone()
    decoder = DECODER.weight.detach().clone()
    for _ in range(40):
        lae.step(x)
    offset = pyro.param("offset").detach()
    assert (offset > 0.5).all()  # moved towards the data mean (2.0)
    assert not torch.equal(DECODER.weight, decoder)
    assert not torch.equal(encoder[0].weight, trunk)
    # the chain (final weight) moved by MCMC only: the optimizer never held it
    chain = lae.kernel.chain_params[0]
    if kind == "torch":
        assert all(p is not chain for g in lae.optim.param_groups for p in g["params"])
    else:
        assert chain not in lae.optim.optim_objs


def test_module_svi_with_jit_trace_elbo_trains_and_estimates_the_same_elbo():
    """Pyro's JitTrace_ELBO under ModuleSVI is compiled by pyro_lvm's guarded compiler
    (never TorchScript): its loss estimates the same ELBO as Trace_ELBO (means of 30 draws
    agree within 4 standard errors) and its steps train the model."""
    from pyro.infer import JitTrace_ELBO

    x = data()
    train, test = x[:64], x[64:]
    vae = make_vae()
    svi = ModuleSVI(
        vae.model,
        vae.guide,
        torch.optim.Adam(vae.parameters(), lr=1e-2),
        JitTrace_ELBO(),
        jit_compile="fx",  # the captured graphs without Inductor's compile time
    )
    torch.manual_seed(offset_seed(7))
    draws = {"jit": [], "plain": []}
    batch = train[:16]
    for _ in range(30):
        draws["jit"].append(svi.evaluate_loss(batch))
        draws["plain"].append(Trace_ELBO().loss(vae.model, vae.guide, batch))
    j, p = torch.tensor(draws["jit"]), torch.tensor(draws["plain"])
    se = (j.var() / len(j) + p.var() / len(p)).sqrt()
    assert abs(j.mean() - p.mean()) < 4 * se
    start = held_out_nelbo(vae, test)
    before = copy.deepcopy(vae.state_dict())
    for i in range(40):
        svi.step(train[(i % 4) * 16 : (i % 4 + 1) * 16])
    assert svi._compiled.eager_reason is None and svi._compiled.num_compiled == 2
    assert all(not torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    assert held_out_nelbo(vae, test) < start - 0.5


def test_drivers_skip_re_registration_only_for_parameters_they_hold():
    """Under ModuleSVI with a torch optimizer over every parameter, the ready model does
    not re-register them each call (a cost); with an optimizer over part of them it does,
    so the rest still join as a new parameter group and train."""
    x = data()[:16]
    vae = make_vae()
    pyro.clear_param_store()
    ModuleSVI(vae.model, vae.guide, torch.optim.Adam(vae.parameters(), lr=1e-2)).step(x)
    assert len(pyro.get_param_store()) == 0
    vae = make_vae()
    decoder_before = copy.deepcopy(vae.decoder.state_dict())
    svi = ModuleSVI(vae.model, vae.guide, torch.optim.Adam(vae.encoder.parameters(), lr=1e-2))
    svi.step(x)
    svi.step(x)
    assert len(svi.optim.param_groups) == 2  # the decoder and likelihood joined
    assert any(not torch.equal(v, decoder_before[k]) for k, v in vae.decoder.state_dict().items())
