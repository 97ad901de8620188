"""AIS on models written the ways other people write Pyro models: a masked observation,
an unsized data plate (Pyro's SS-VAE, labelled), and models that cannot take a chain
dimension (``.expand`` to the number of rows, a ``BatchNorm`` decoder, ProdLDA).

Exact answers from :mod:`written_models`; AIS weights are unbiased for :math:`p(x)`
(Neal 2001), so :math:`w / p(x)` must average to 1 within 5 standard errors.
"""

from __future__ import annotations

import pyro
import pytest
import torch
import written_models as wm
from bernoulli_toy import assert_unbiased_log_weights
from seeding import offset_seed

from pyro_lvm.infer import ais_log_likelihood, annealed_importance_sampling
from pyro_lvm.infer.sites import check_vectorized, find_latents, log_densities, sample_prior


@pytest.fixture
def lg(float64):
    A, c, M = wm.params()
    return A, c, M, wm.data(3, seed=offset_seed(1))


def test_a_masked_observation_has_log_likelihood_exactly_zero(lg):
    A, c, _, x = lg
    mask = torch.arange(3) != 0
    torch.manual_seed(offset_seed(2))
    est = ais_log_likelihood(wm.model_plate, x, A, c, mask, num_steps=5, num_chains=4)
    assert est[0] == 0.0 and (est[1:] < 0).all()


def test_semi_supervised_model_with_an_unsized_plate(lg):
    """Labelled (``y`` observed, ``z`` annealed) with ``pyro.plate("data")`` of no size."""
    A, c, M, x = lg
    ys = torch.eye(wm.C, dtype=x.dtype)[torch.tensor([0, 2, 1])]
    exact = (wm.ss_exact(x, A, c, M) * ys).sum(-1)
    torch.manual_seed(offset_seed(3))
    result = annealed_importance_sampling(
        wm.ss_model, x, ys, A=A, c=c, M=M, num_steps=10, num_chains=1000, step_size=0.3
    )
    assert result.log_weights.shape == (1000, 3)
    assert_unbiased_log_weights(result.log_weights, exact)


@pytest.mark.parametrize("kind", ["expand", "batchnorm", "mixing"])
def test_a_model_that_cannot_take_chains_runs_one_chain_per_call(lg, kind):
    A, c, _, x = lg
    if kind == "batchnorm":
        net = wm.BatchNormDecoder()
        A, c = net.affine()
        model = lambda x, A, c: net.model(x)  # noqa: E731
    else:
        model = {"expand": wm.model_expand, "mixing": wm.model_mixing}[kind]
    spec = check_vectorized(model, find_latents(model, x, A, c), x, A, c)
    assert not spec.vectorized
    torch.manual_seed(offset_seed(4))
    result = annealed_importance_sampling(
        model, x, A, c, num_steps=5, num_chains=300, step_size=0.3
    )
    assert_unbiased_log_weights(result.log_weights, wm.exact_log_likelihood(x, A, c))


def test_one_chain_per_call_gives_the_vectorized_numbers(lg):
    A, c, _, x = lg
    spec = check_vectorized(wm.model_plate, find_latents(wm.model_plate, x, A, c), x, A, c)
    assert spec.vectorized
    looped = spec._replace(vectorized=False)
    u = sample_prior(wm.model_plate, looped, 4, x, A, c).requires_grad_()
    fast = log_densities(wm.model_plate, spec, u, x, A, c)
    slow = log_densities(wm.model_plate, looped, u, x, A, c)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    grads = [torch.autograd.grad(sum(t.sum() for t in pair), u)[0] for pair in (fast, slow)]
    assert torch.allclose(*grads, atol=1e-12, rtol=0)


def test_ais_runs_on_the_prodlda_port(float64):
    from outside_models import prodlda

    docs = prodlda.synthetic_documents(6, vocab_size=12, num_topics=3).double()
    lda = prodlda.ProdLDA(vocab_size=12, num_topics=3, hidden=10, dropout=0.2).double().eval()
    est = ais_log_likelihood(lda.model, docs, num_steps=5, num_chains=4)
    assert est.shape == (6,) and torch.isfinite(est).all()


def test_a_max_plate_nesting_beyond_the_model_names_the_right_value(lg):
    A, c, _, x = lg
    with pytest.raises(ValueError, match="pass max_plate_nesting=1") as info:
        ais_log_likelihood(wm.model_plate, x, A, c, num_steps=3, max_plate_nesting=2)
    assert "\n" not in str(info.value)


def test_a_global_latent_is_still_refused_as_outside_the_data_plate(lg):
    A, c, _, x = lg

    def model(x):
        z = pyro.sample("z", pyro.distributions.Normal(x.new_zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", pyro.distributions.Normal(z, 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="outside the data plate"):
        ais_log_likelihood(model, x, num_steps=3)
