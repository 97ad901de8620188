"""LAE (Algorithm 2): gradients, the chain parameter, adaptation and checkpoints."""

import copy

import pyro
import pytest
import torch
from pyro import poutine
from seeding import offset_seed

from pyro_lvm.infer import LAE, AmortizedLangevin, RankConditionWarning
from pyro_lvm.infer.mcmc import ald
from pyro_lvm.models.likelihoods import GaussianLikelihood
from pyro_lvm.models.nets import MLP
from pyro_lvm.models.vae import VAE


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: one thread is ~10x faster than two on a shared, busy CPU
    # (the conftest fixture restores the thread count after each test)
    torch.set_num_threads(1)


DATA, LATENT, BATCH = 6, 2, 16


def make(seed=0, width=24, **options):
    torch.manual_seed(offset_seed(seed))
    lvm = VAE(DATA, LATENT, hidden_dim=16, depth=1, likelihood=GaussianLikelihood(scale=0.5))
    encoder = MLP(DATA, LATENT, hidden_dim=width, depth=1)
    params = [*lvm.decoder.parameters(), *lvm.likelihood.parameters(), *encoder.parameters()]
    optim = torch.optim.Adam(params, lr=options.pop("lr", 1e-2))
    return lvm, encoder, LAE(lvm.model, encoder, optim, **options)


def data(n=64, seed=1):
    gen = torch.Generator().manual_seed(offset_seed(seed))
    z = torch.randn(n, LATENT, generator=gen)
    return torch.tanh(z @ torch.randn(LATENT, DATA, generator=gen)) + 0.1 * torch.randn(
        n, DATA, generator=gen
    )


def potential_with_graph(lvm, encoder, x, weight):
    """V(Phi) = -log p(x, z = g(x) Phi^T + b) recomputed from scratch, Phi held constant."""
    features = torch.nn.Sequential(*list(encoder)[:-1])(x)
    z = torch.nn.functional.linear(features, weight.detach(), encoder[-1].bias)
    model = poutine.condition(lvm.model, data={"z": z})
    return -poutine.trace(model).get_trace(x).log_prob_sum()


def _recording(monkeypatch) -> list:
    """The chain's head weight after every transition LAE runs."""
    states, original = [], ald.ald_transition

    def recording(langevin, batch, *args, **kwargs):
        langevin, info = original(langevin, batch, *args, **kwargs)
        (weight,) = batch.chain.params_of(langevin.position[: batch.chain_size])
        states.append(weight.detach().clone())
        return langevin, info

    monkeypatch.setattr(ald, "ald_transition", recording)
    return states


def test_loss_decreases():
    x = data()
    lvm, encoder, lae = make()
    before = lae.evaluate_loss(x)
    for i in range(80):
        lae.step(x[(i % 4) * BATCH : (i % 4 + 1) * BATCH])
    after = lae.evaluate_loss(x)
    assert after < before - 0.2 * abs(before)


def test_chain_weight_is_not_in_the_optimizer():
    lvm, encoder, lae = make()
    lae.step(data()[:BATCH])  # the chain is found on the first batch, then left out
    groups = [p for g in lae.optim.param_groups for p in g["params"]]
    assert all(p is not encoder[-1].weight for p in groups)
    assert any(p is encoder[-1].bias for p in groups)  # the bias is trained like the trunk
    trained = [*lvm.decoder.parameters(), *lvm.likelihood.parameters(), *encoder.parameters()]
    assert len(groups) == len(trained) - 1


def test_rejected_chain_never_moves_but_the_rest_trains():
    # a huge step: every proposal is rejected, so Phi must stay put exactly, while the
    # decoder and trunk still take optimizer steps
    x = data()[:BATCH]
    lvm, encoder, lae = make(step_size=1e6, adapt_step_size=False)
    phi = encoder[-1].weight.detach().clone()
    dec = copy.deepcopy(lvm.decoder.state_dict())
    for _ in range(3):
        lae.step(x)
    assert lae.metrics()["accept_rate"] == 0.0
    torch.testing.assert_close(encoder[-1].weight, phi, rtol=0, atol=0)
    assert not torch.equal(lvm.decoder.state_dict()["0.weight"], dec["0.weight"])


@pytest.mark.parametrize("num_steps,precondition", [(1, None), (2, None), (3, None), (2, 1e-3)])
def test_gradient_is_the_mean_potential_at_the_chain_states(
    float64, num_steps, precondition, monkeypatch
):
    x = data()[:BATCH]
    # the paper's gradient: without the trunk's Jacobian correction (tested on its own in
    # test_trunk_jacobian.py)
    lvm, encoder, lae = make(
        num_steps=num_steps,
        step_size=1e-3,
        adapt_step_size=False,
        precondition=precondition,
        jacobian=False,
    )
    lae.step(x)  # finds the chain, which leaves the optimizer
    lae.optim = torch.optim.SGD(lae._params(), lr=0.0)  # keep the gradients, move nothing
    states = _recording(monkeypatch)
    loss = lae.step(x)
    assert len(states) == num_steps
    expected = sum(potential_with_graph(lvm, encoder, x, w) for w in states) / num_steps
    assert loss == pytest.approx(expected.item(), rel=1e-10)
    params = lae._params()
    grads = torch.autograd.grad(expected, params, allow_unused=True)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g if g is not None else torch.zeros_like(p))
    assert encoder[-1].weight.grad is None


def test_chain_persists_and_encoder_holds_its_state(monkeypatch):
    x = data()
    lvm, encoder, lae = make()
    states = _recording(monkeypatch)
    lae.step(x[:BATCH])
    torch.testing.assert_close(states[-1], encoder[-1].weight.detach(), rtol=0, atol=0)
    state = lae.kernel.state  # what the kernel keeps between batches holds no graph
    assert all(not torch.is_tensor(v) or v.grad_fn is None for v in state)


def test_step_size_adaptation_keeps_acceptance_near_target():
    x = data(128)
    lvm, encoder, lae = make(width=40, step_size=1e-6)  # far too small a start
    for i in range(120):
        lae.step(x[(i % 4) * 32 : (i % 4 + 1) * 32])
    m = lae.metrics()  # the latest 100 transitions
    assert lae.metrics() == m  # reading does not reset
    assert set(m) == {"accept_rate", "step_size", "move", "move_ratio"}
    assert 0.3 < m["accept_rate"] < 0.9
    assert m["step_size"] > 1e-5
    # the latents move (the RMS move per transition is a visible share of their spread)
    assert m["move"] > 0 and 1e-3 < m["move_ratio"] < 1


def test_state_dict_round_trip():
    x = data()
    lvm_a, enc_a, lae_a = make(seed=0)
    for i in range(5):
        lae_a.step(x[i * 8 : i * 8 + BATCH])
    saved = copy.deepcopy(
        {"lae": lae_a.state_dict(), "lvm": lvm_a.state_dict(), "enc": enc_a.state_dict()}
    )
    lvm_b, enc_b, lae_b = make(seed=123)
    lvm_b.load_state_dict(saved["lvm"])
    enc_b.load_state_dict(saved["enc"])
    lae_b.load_state_dict(saved["lae"])
    losses = []
    for lae in (lae_a, lae_b):
        pyro.set_rng_seed(offset_seed(7))
        losses.append([lae.step(x[:BATCH]) for _ in range(3)])
    assert losses[0] == losses[1]
    assert lae_a.kernel.state.step_size == lae_b.kernel.state.step_size
    for a, b in zip(enc_a.parameters(), enc_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rank_condition_warning_once():
    x = data()
    lvm, encoder, lae = make(width=8)
    with pytest.warns(RankConditionWarning, match="8 features for a batch of 16"):
        lae.step(x[:BATCH])
        lae.step(x[BATCH : 2 * BATCH])


def test_bad_input():
    lvm = VAE(DATA, LATENT, hidden_dim=8, depth=1)
    encoder = MLP(DATA, LATENT, hidden_dim=8, depth=1)
    optim = torch.optim.Adam(encoder.parameters())
    with pytest.raises(ValueError, match="num_steps"):
        LAE(lvm.model, encoder, optim, num_steps=0)
    with pytest.raises(ValueError, match="step_size must be positive"):
        LAE(lvm.model, encoder, optim, step_size=0.0)
    kernel = AmortizedLangevin(lvm.model, encoder)
    with pytest.raises(ValueError, match="configure the kernel"):
        LAE(lvm.model, encoder, optim, kernel=kernel, mh=False)
