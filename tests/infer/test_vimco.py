"""VIMCO against the exactly enumerated K-sample bound and its gradient."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from bernoulli_toy import DATA, ToySBN, assert_unbiased, estimate_grads, exact_grad
from pyro import poutine
from seeding import offset_seed

from pyro_lvm.infer import ModuleSVI, iwae_log_likelihood
from pyro_lvm.infer.vimco import VIMCO, leave_one_out_signals

REPEATS = 100
# 40 copies of each row: one step averages 40 independent per-row estimates
ROWS = DATA.repeat(40, 1)


@pytest.mark.parametrize("layers,k", [(1, 2), (2, 2), pytest.param(1, 3, marks=pytest.mark.slow)])
def test_gradient_unbiased_for_the_k_sample_bound(float64, layers, k):
    # all (2^bits)^K joint particle states are enumerated for the exact gradient
    toy = ToySBN(layers)
    exact = exact_grad(toy, lambda: toy.exact_iwae_bound(ROWS, k))
    vimco = VIMCO(num_particles=k, max_plate_nesting=1)
    samples = estimate_grads(
        toy, lambda: vimco.differentiable_loss(toy.model, toy.guide, ROWS), REPEATS
    )
    assert_unbiased(samples, exact)


def test_bound_is_the_importance_weighted_bound(float64):
    toy = ToySBN(1)
    vimco = VIMCO(num_particles=3, max_plate_nesting=1)
    # same random draws -> the same number as the shared IWAE evaluator
    pyro.set_rng_seed(offset_seed(7))
    loss = vimco.loss(toy.model, toy.guide, DATA)
    pyro.set_rng_seed(offset_seed(7))
    iwae = iwae_log_likelihood(toy.model, toy.guide, DATA, num_samples=3)
    assert loss == pytest.approx(-float(iwae.sum()), rel=1e-10)
    # and its mean is the exactly enumerated K-sample bound
    with torch.no_grad(), pyro.validation_enabled(False):
        losses = torch.tensor([vimco.loss(toy.model, toy.guide, ROWS) for _ in range(50)])
        exact = -float(toy.exact_iwae_bound(ROWS, 3))
    se = float(losses.std()) / math.sqrt(len(losses))
    assert abs(float(losses.mean()) - exact) < 4 * se


def test_differentiable_loss_value_and_subsample_scale(float64):
    toy = ToySBN(1, num_data=12)
    vimco = VIMCO(num_particles=4, max_plate_nesting=1)
    idx = torch.tensor([0, 5, 11])
    pyro.set_rng_seed(offset_seed(2))
    loss = vimco.differentiable_loss(toy.model, toy.guide, DATA, idx)
    toy.num_data = None
    pyro.set_rng_seed(offset_seed(2))
    unscaled = vimco.differentiable_loss(toy.model, toy.guide, DATA, idx)
    assert float(loss.detach()) == pytest.approx(4 * float(unscaled.detach()))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in toy.parameters())


def test_leave_one_out_signals_match_definition(float64):
    log_w = torch.randn(4, 3)
    k = log_w.shape[0]
    expected = torch.empty_like(log_w)
    for j in range(k):
        others = torch.cat([log_w[:j], log_w[j + 1 :]])
        replaced = torch.cat([others, others.mean(0, keepdim=True)])
        expected[j] = log_w.logsumexp(0) - replaced.logsumexp(0)
    assert torch.allclose(leave_one_out_signals(log_w), expected)


def test_trains_with_module_svi(float64):
    toy = ToySBN(2)
    vimco = VIMCO(num_particles=5, max_plate_nesting=1)
    svi = ModuleSVI(toy.model, toy.guide, torch.optim.Adam(toy.parameters(), lr=0.1), vimco)
    before = -float(toy.exact_iwae_bound(DATA, 1).detach())
    for _ in range(30):
        svi.step(DATA)
    assert -float(toy.exact_iwae_bound(DATA, 1).detach()) < before


def test_too_few_particles_or_unknown_weights_are_errors():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        VIMCO(num_particles=1)
    with pytest.raises(ValueError, match="'auto', 'datapoint' or 'program'"):
        VIMCO(weights="global")


def test_latent_outside_data_plate_is_an_error():
    def model(x):
        w = pyro.sample("w", dist.Bernoulli(0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x):
        pyro.sample("w", dist.Bernoulli(0.3))

    vimco = VIMCO(num_particles=2, max_plate_nesting=1, weights="datapoint")
    with pytest.raises(ValueError, match="inside the data plate"):
        vimco.loss(model, guide, torch.zeros(3))


@pytest.mark.parametrize("vectorize", [False, True])
def test_whole_program_gradient_unbiased(float64, vectorize):
    """One weight per particle for all rows: unbiased for the enumerated bound, each
    particle a joint state of every row's latents."""
    toy = ToySBN(1)
    exact = exact_grad(toy, lambda: toy.exact_whole_program_bound(DATA, 2))
    vimco = VIMCO(
        num_particles=2, max_plate_nesting=1, weights="program", vectorize_particles=vectorize
    )
    samples = estimate_grads(
        toy, lambda: vimco.differentiable_loss(toy.model, toy.guide, DATA), 400
    )
    assert_unbiased(samples, exact)


W = 0.7  # the value a global site is conditioned on


def test_global_site_conditioned_out_is_a_constant(float64):
    """A global site conditioned out, as the refusal advises: log p(w) joins the bound
    as a constant; the gradient stays unbiased for the enumerated bound."""
    toy = ToySBN(1)
    w = torch.tensor(W, dtype=torch.float64)

    def with_global(x, idx=None):
        pyro.sample("w", dist.Normal(toy.dec[1].sum(), 1.0))
        toy.model(x, idx)

    model = poutine.condition(with_global, data={"w": w})

    def constant():
        return dist.Normal(toy.dec[1].sum(), 1.0).log_prob(w)

    vimco = VIMCO(num_particles=2, max_plate_nesting=1)
    vimco.loss(model, toy.guide, DATA)  # the first call checks the structure (one more pass)
    pyro.set_rng_seed(offset_seed(11))
    conditioned = vimco.loss(model, toy.guide, DATA)
    pyro.set_rng_seed(offset_seed(11))
    plain = vimco.loss(toy.model, toy.guide, DATA)
    assert conditioned == pytest.approx(plain - float(constant().detach()), rel=1e-10)
    exact = exact_grad(toy, lambda: toy.exact_iwae_bound(ROWS, 2) + constant())
    samples = estimate_grads(
        toy, lambda: vimco.differentiable_loss(model, toy.guide, ROWS), REPEATS
    )
    assert_unbiased(samples, exact)


def test_leave_one_out_signals_are_stable_for_many_particles(float64):
    """No cancellation when one weight dominates (exp would overflow)."""
    log_w = torch.zeros(5000, 2)
    log_w[0] = 800.0
    signals = leave_one_out_signals(log_w)
    assert torch.isfinite(signals).all()
    # the dominant particle's baseline replaces w_0 by the others' geometric mean (1)
    assert signals[0, 0] == pytest.approx(800.0 - math.log(5000.0), rel=1e-12)
    assert signals[1:].abs().max() < 1e-12
    # a zero weight: finite signals (the old ``sum - log w_k`` gave inf - inf = nan)
    log_w = torch.tensor([[0.5], [-math.inf], [1.0]])
    signals = leave_one_out_signals(log_w)
    assert torch.isfinite(signals).all()
    others = [torch.cat([log_w[:j], log_w[j + 1 :]]) for j in range(3)]
    expected = torch.stack(
        [log_w.logsumexp(0) - torch.logaddexp(o.logsumexp(0), o.mean(0)) for o in others]
    )
    assert torch.allclose(signals, expected)


def test_empty_program_has_bound_zero():
    vimco = VIMCO(num_particles=3)
    assert vimco.loss(lambda: None, lambda: None) == 0.0
    assert vimco.loss_and_grads(lambda: None, lambda: None) == 0.0
