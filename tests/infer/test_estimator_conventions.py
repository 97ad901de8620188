"""The Bernoulli-latent estimators follow Pyro's ELBO conventions: every ELBO keyword,
masks, scale tensors, observed guide sites, the data plate found by name, and one-line
errors for the structures they do not support."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from bernoulli_toy import DATA, ToySBN, assert_unbiased, estimate_grads, exact_grad
from pyro import poutine
from pyro.infer import RenyiELBO
from seeding import offset_seed

from pyro_lvm.infer import DisARM, TraceNVIL_ELBO, iwae_log_likelihood
from pyro_lvm.infer.vimco import VIMCO

ROWS = DATA.repeat(40, 1)
MASK = torch.tensor([True, False, True])


def masked(fn, mask):
    return poutine.mask(fn, mask=mask)


def test_every_elbo_keyword_is_accepted():
    options = dict(
        strict_enumeration_warning=False,
        ignore_jit_warnings=True,
        jit_options={},
        retain_graph=True,
        tail_adaptive_beta=-1.0,
    )
    nvil = TraceNVIL_ELBO(num_particles=2, max_plate_nesting=1, **options)
    vimco = VIMCO(num_particles=3, max_plate_nesting=1, vectorize_particles=False, **options)
    disarm = DisARM(num_particles=2, max_plate_nesting=1, vectorize_particles=True, **options)
    assert not vimco.vectorize_particles  # honoured, as by every Pyro ELBO
    assert vimco.retain_graph and nvil.retain_graph
    assert disarm.retain_graph
    toy = ToySBN(1)
    for elbo in (nvil, vimco, disarm):
        assert math.isfinite(elbo.loss(toy.model, toy.guide, DATA))


def test_disarm_finds_the_data_plate_by_name(float64):
    """The same pair of draws gives the same loss whatever the data plate is called."""
    toy = ToySBN(1)

    pyro.set_rng_seed(offset_seed(8))
    flat = DisARM().loss(toy.model, toy.guide, DATA)
    toy.plate = lambda x, idx=None: pyro.plate("rows", x.shape[0], dim=-1)
    with pytest.raises(ValueError, match="data_plate=") as err:
        DisARM().loss(toy.model, toy.guide, DATA)
    assert "\n" not in str(err.value)
    pyro.set_rng_seed(offset_seed(8))
    renamed = DisARM(data_plate="rows").loss(toy.model, toy.guide, DATA)
    assert renamed == pytest.approx(flat, rel=1e-12)


@pytest.mark.parametrize("mask", [MASK, False, True])
def test_vimco_under_a_mask_is_the_bound_of_the_unmasked_rows(float64, mask):
    """On common random numbers: each masked row's bound is exactly 0, the others are
    unchanged (the per-datapoint IWAE estimates of the same draws)."""
    toy = ToySBN(1)
    vimco = VIMCO(num_particles=3, max_plate_nesting=1)
    pyro.set_rng_seed(offset_seed(3))
    loss = vimco.loss(masked(toy.model, mask), masked(toy.guide, mask), DATA)
    pyro.set_rng_seed(offset_seed(3))
    iwae = iwae_log_likelihood(toy.model, toy.guide, DATA, num_samples=3)
    keep = torch.as_tensor(mask).expand(DATA.shape[0])
    assert loss == pytest.approx(-float(iwae[keep].sum()), rel=1e-10, abs=1e-12)


def test_vimco_fully_masked_is_zero_with_zero_gradient(float64):
    toy = ToySBN(1)
    vimco = VIMCO(num_particles=2, max_plate_nesting=1)
    loss = vimco.differentiable_loss(masked(toy.model, False), masked(toy.guide, False), DATA)
    assert float(loss.detach()) == 0.0
    if loss.requires_grad:
        loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in toy.parameters())


def test_vimco_gradient_under_a_mask_is_unbiased_for_the_subset_bound(float64):
    toy = ToySBN(1)
    rows_mask = MASK.repeat(40)
    exact = exact_grad(toy, lambda: toy.exact_iwae_bound(ROWS[rows_mask], 2))
    vimco = VIMCO(num_particles=2, max_plate_nesting=1)
    model, guide = masked(toy.model, rows_mask), masked(toy.guide, rows_mask)
    samples = estimate_grads(toy, lambda: vimco.differentiable_loss(model, guide, ROWS), 100)
    assert_unbiased(samples, exact)


def test_vimco_per_datapoint_scale_tensor(float64):
    toy = ToySBN(1)
    scale = torch.tensor([0.5, 2.0, 3.0])
    vimco = VIMCO(num_particles=3, max_plate_nesting=1)
    pyro.set_rng_seed(offset_seed(4))
    model, guide = (poutine.scale(f, scale=scale) for f in (toy.model, toy.guide))
    loss = vimco.loss(model, guide, DATA)
    pyro.set_rng_seed(offset_seed(4))
    iwae = iwae_log_likelihood(toy.model, toy.guide, DATA, num_samples=3)
    assert loss == pytest.approx(-float((scale * iwae).sum()), rel=1e-10)


def test_vimco_different_scales_within_a_datapoint_are_an_error(float64):
    toy = ToySBN(1)
    model = poutine.scale(toy.model, scale=2.0)  # the model only: a tempered weight
    vimco = VIMCO(num_particles=2, max_plate_nesting=1, weights="datapoint")
    with pytest.raises(ValueError, match="different scales") as err:
        vimco.loss(model, toy.guide, DATA)
    assert "\n" not in str(err.value)
    _assert_auto_is_whole_program(model, toy.guide, DATA)


def test_vimco_observed_guide_site_enters_the_weights(float64):
    toy = ToySBN(1)
    factor = torch.tensor([0.3, -1.0, 2.0])

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Bernoulli(logits=x @ toy.enc[0].T + toy.enc[1]).to_event(1))
            pyro.factor("f", factor, has_rsample=False)

    vimco = VIMCO(num_particles=3, max_plate_nesting=1)
    pyro.set_rng_seed(offset_seed(5))
    with_factor = vimco.loss(toy.model, guide, DATA)
    pyro.set_rng_seed(offset_seed(5))
    without = vimco.loss(toy.model, toy.guide, DATA)
    # log w -= f (as Trace_ELBO subtracts the guide's log-densities): the loss grows by sum f
    assert with_factor == pytest.approx(without + float(factor.sum()), rel=1e-10)


def test_vimco_finds_the_data_plate_by_name(float64):
    """data at dim -2, pixels at dim -1: the same bound as the flat model on the same draws."""
    toy = ToySBN(1)

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            logits = toy.prior_logits.expand(x.shape[0], 1, -1)
            z = pyro.sample("z1", dist.Bernoulli(logits=logits).to_event(1))
            with pyro.plate("pix", x.shape[1], dim=-1):
                pyro.sample(
                    "x", dist.Bernoulli(logits=z.squeeze(-2) @ toy.dec[0].T + toy.dec[1]), obs=x
                )

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            logits = (x @ toy.enc[0].T + toy.enc[1]).unsqueeze(-2)
            pyro.sample("z1", dist.Bernoulli(logits=logits).to_event(1))

    vimco = VIMCO(num_particles=3, max_plate_nesting=2)
    pyro.set_rng_seed(offset_seed(6))
    nested = vimco.loss(model, guide, DATA)
    pyro.set_rng_seed(offset_seed(6))
    flat = VIMCO(num_particles=3, max_plate_nesting=1).loss(toy.model, toy.guide, DATA)
    assert nested == pytest.approx(flat, rel=1e-10)


def _sibling_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(x.shape[0])))
    with pyro.plate("pix", x.shape[0]):  # same size and dim: must not be paired with data
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _sibling_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(0.3 * torch.ones(x.shape[0])))


def _global_model(x):
    w = pyro.sample("w", dist.Bernoulli(0.5))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(w, 1.0), obs=x)


def _global_guide(x):
    pyro.sample("w", dist.Bernoulli(0.3))


def _sequential_model(x):
    for i in pyro.plate("data", x.shape[0]):
        pyro.sample(f"x_{i}", dist.Normal(0.0, 1.0), obs=x[i])


def _sequential_guide(x):
    pass


@pytest.mark.parametrize(
    "model,guide,match",
    [
        (_sibling_model, _sibling_guide, "site 'x' inside the data plate 'data'"),
        (_global_model, _global_guide, "global latents are not supported"),
        (_sequential_model, _sequential_guide, "sequential"),
    ],
)
def test_vimco_refuses_unsupported_structures_in_one_line(model, guide, match):
    """weights="datapoint" refuses what per-datapoint weights cannot cover; "auto" takes
    whole-program weights there."""
    vimco = VIMCO(num_particles=2, max_plate_nesting=1, weights="datapoint")
    with pytest.raises(ValueError, match=match) as err:
        vimco.loss(model, guide, torch.zeros(3))
    assert "\n" not in str(err.value)
    _assert_auto_is_whole_program(model, guide, torch.zeros(3))


def _assert_auto_is_whole_program(model, guide, x):
    losses = []
    for weights in ("auto", "program"):
        pyro.set_rng_seed(offset_seed(12))
        losses.append(
            VIMCO(num_particles=2, max_plate_nesting=1, weights=weights).loss(model, guide, x)
        )
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)


def _renamed(toy, fn, plate="rows", global_latent=False):
    """The toy model or guide with its data plate called ``plate``, optionally with a
    global Normal latent ``w`` outside it."""

    def wrapped(x):
        shift = 0.0
        if global_latent:
            loc = toy.dec[1].sum() if fn == "model" else toy.enc[1].sum()
            shift = pyro.sample("w", dist.Normal(loc, 1.0))
        with pyro.plate(plate, x.shape[0], dim=-1):
            logits = toy.prior_logits.expand(x.shape[0], -1)
            if fn == "model":
                z = pyro.sample("z1", dist.Bernoulli(logits=logits).to_event(1))
                p = z @ toy.dec[0].T + toy.dec[1] + shift
                pyro.sample("x", dist.Bernoulli(logits=p).to_event(1), obs=x)
            else:
                p = x @ toy.enc[0].T + toy.enc[1]
                pyro.sample("z1", dist.Bernoulli(logits=p).to_event(1))

    return wrapped


@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("weights", ["auto", "program"])
@pytest.mark.parametrize("plate", ["rows", "data"])
def test_vimco_whole_program_weights_are_renyis(float64, plate, weights, scale):
    """A global latent, or no plate named like ``data_plate``: one weight per particle
    for the whole program, the scaled log-densities inside, as Pyro's
    ``RenyiELBO(alpha=0)`` where no plate holds every site (same draws)."""
    toy = ToySBN(1)
    model, guide = (
        poutine.scale(_renamed(toy, f, plate, global_latent=True), scale=scale)
        for f in ("model", "guide")
    )
    options = dict(num_particles=3, max_plate_nesting=1, vectorize_particles=True)
    vimco = VIMCO(weights=weights, **options)
    pyro.set_rng_seed(offset_seed(9))
    whole = vimco.loss(model, guide, DATA)
    pyro.set_rng_seed(offset_seed(9))
    renyi = RenyiELBO(alpha=0.0, **options).loss(model, guide, DATA)
    assert whole == pytest.approx(renyi, rel=1e-10)


def test_vimco_data_plate_keyword(float64):
    """data_plate="rows" gives the per-datapoint bound of the same draws."""
    toy = ToySBN(1)
    vimco = VIMCO(num_particles=2, max_plate_nesting=1, data_plate="rows")
    pyro.set_rng_seed(offset_seed(10))
    rows = vimco.loss(_renamed(toy, "model"), _renamed(toy, "guide"), DATA)
    pyro.set_rng_seed(offset_seed(10))
    flat = VIMCO(num_particles=2, max_plate_nesting=1).loss(toy.model, toy.guide, DATA)
    assert rows == pytest.approx(flat, rel=1e-10)
