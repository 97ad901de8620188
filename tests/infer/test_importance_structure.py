"""The IWAE evaluator on models written the ways other people write Pyro models: with and
without a data plate, with ``max_plate_nesting`` larger than needed, with masks, unsized
plates, discrete latents sampled in the guide, and models that cannot take a particle
dimension. Exact answers from :mod:`written_models` (linear-Gaussian, closed form).

Two kinds of check. With the exact posterior as the guide every weight equals
:math:`p(x)`, so the estimate must equal the closed form to rounding. With a widened
guide, :math:`w / p(x)` must average to 1 (the weights are unbiased): within 5 standard
errors of the mean of ``K`` ratios, whose variance is finite because the guide is wider
than the posterior.
"""

from __future__ import annotations

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
import written_models as wm
from bernoulli_toy import assert_unbiased_log_weights
from seeding import offset_seed

from pyro_lvm.infer import iwae_log_likelihood, log_importance_weights
from pyro_lvm.infer.particles import PARTICLE_PLATE

TIGHT = 1e-9  # float64 rounding of a few dozen terms


@pytest.fixture
def lg(float64):
    A, c, M = wm.params()
    return A, c, M, wm.data(5, seed=offset_seed(1))


def test_with_a_data_plate_each_row_is_exact(lg):
    A, c, _, x = lg
    est = iwae_log_likelihood(wm.model_plate, wm.guide_plate, x, A, c, num_samples=7)
    assert est.shape == (5,)
    assert torch.allclose(est, wm.exact_log_likelihood(x, A, c), atol=TIGHT, rtol=0)


def test_without_a_data_plate_only_the_whole_batch_has_an_estimate(lg):
    A, c, _, x = lg
    with pytest.raises(ValueError, match="pass per_datapoint=False") as info:
        iwae_log_likelihood(wm.model_no_plate, wm.guide_no_plate, x, A, c, num_samples=7)
    assert "\n" not in str(info.value)
    whole = iwae_log_likelihood(
        wm.model_no_plate, wm.guide_no_plate, x, A, c, num_samples=7, per_datapoint=False
    )
    assert whole.shape == ()
    assert torch.allclose(whole, wm.exact_log_likelihood(x, A, c).sum(), atol=TIGHT, rtol=0)
    # per_datapoint=None: per row where a data plate exists, else the whole batch
    auto = log_importance_weights(
        wm.model_no_plate, wm.guide_no_plate, x, A, c, num_samples=3, per_datapoint=None
    )
    assert auto.shape == (3,)


@pytest.mark.parametrize("style", ["plate", "no plate"])
def test_weights_are_unbiased_with_a_wider_guide(lg, style):
    A, c, _, x = lg
    torch.manual_seed(offset_seed(2))
    exact = wm.exact_log_likelihood(x, A, c)
    if style == "plate":
        pair, kw = (wm.model_plate, partial(wm.guide_plate, inflate=1.3)), {}
    else:
        pair, kw = (wm.model_no_plate, partial(wm.guide_no_plate, inflate=1.1)), {}
        kw, exact = {"per_datapoint": False}, exact.sum()
    log_w = log_importance_weights(*pair, x, A, c, num_samples=4000, **kw)
    assert_unbiased_log_weights(log_w, exact)


def test_a_larger_max_plate_nesting_still_gives_one_value_per_row(lg):
    A, c, _, x = lg
    est = iwae_log_likelihood(
        wm.model_plate, wm.guide_plate, x, A, c, num_samples=7, max_plate_nesting=2
    )
    assert torch.allclose(est, wm.exact_log_likelihood(x, A, c), atol=TIGHT, rtol=0)


@pytest.mark.parametrize("how", ["poutine.mask", "dist.mask"])
def test_a_masked_observation_has_log_likelihood_zero(lg, how):
    A, c, _, x = lg
    mask = torch.arange(5) != 0
    if how == "poutine.mask":
        model = wm.model_plate
    else:

        def model(x, A, c, mask):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                obs = dist.Normal(z @ A.T + c, wm.SIGMA).to_event(1).mask(mask)
                pyro.sample("x", obs, obs=x)

    est = iwae_log_likelihood(model, wm.guide_plate, x, A, c, mask, num_samples=7)
    expected = torch.where(mask, wm.exact_log_likelihood(x, A, c), 0.0)
    assert est[0] == 0.0
    assert torch.allclose(est, expected, atol=TIGHT, rtol=0)


@pytest.mark.parametrize("vectorize", [None, False])
@pytest.mark.parametrize("labelled", [False, True])
def test_semi_supervised_model_with_an_unsized_plate_is_exact(lg, labelled, vectorize):
    """Unlabelled, the guide samples the discrete ``y``: the estimate is log p(x); labelled,
    the model observes ``y``: log p(x, y). Vectorized or one particle per call."""
    A, c, M, x = lg
    table = wm.ss_exact(x, A, c, M)
    ys = torch.eye(wm.C, dtype=x.dtype)[torch.tensor([0, 2, 1, 1, 0])]
    args, exact = ((x, ys), (table * ys).sum(-1)) if labelled else ((x,), table.logsumexp(-1))
    kw = {} if vectorize is None else {"vectorize_particles": vectorize}
    est = iwae_log_likelihood(wm.ss_model, wm.ss_guide, *args, A=A, c=c, M=M, num_samples=9, **kw)
    assert torch.allclose(est, exact, atol=TIGHT, rtol=0)


class _Count:
    """Calls of a guide with and without the particle plate."""

    def __init__(self, guide):
        self.guide, self.plated, self.single = guide, 0, 0

    def __call__(self, *args, **kwargs):
        names = [getattr(f, "name", None) for f in pyro.poutine.runtime._PYRO_STACK]
        if PARTICLE_PLATE in names:
            self.plated += 1
        else:
            self.single += 1
        return self.guide(*args, **kwargs)


@pytest.mark.parametrize("kind", ["expand", "batchnorm", "mixing"])
def test_a_model_that_cannot_take_particles_runs_one_per_call(lg, kind):
    """``.expand([n])`` and BatchNorm fail with a particle dimension; the mixing decoder
    runs but pairs rows with other particles' latents. All three give the exact answer,
    one particle per model call."""
    A, c, _, x = lg
    if kind == "batchnorm":
        net = wm.BatchNormDecoder()
        A, c = net.affine()
        model = lambda x, A, c: net.model(x)  # noqa: E731
    else:
        model = {"expand": wm.model_expand, "mixing": wm.model_mixing}[kind]
    guide = _Count(wm.guide_plate)
    est = iwae_log_likelihood(model, guide, x, A, c, num_samples=30, chunk_size=10)
    assert torch.allclose(est, wm.exact_log_likelihood(x, A, c), atol=TIGHT, rtol=0)
    assert guide.plated <= 1  # one vectorized attempt at most, then one particle per call
    assert guide.single >= 30


def test_a_vectorizable_model_stays_vectorized(lg):
    A, c, _, x = lg
    guide = _Count(wm.guide_plate)
    iwae_log_likelihood(wm.model_plate, guide, x, A, c, num_samples=30, chunk_size=10)
    assert guide.plated == 3
    assert guide.single == 2  # the inspection, and the check of the first chunk


def test_forced_vectorization_of_a_model_that_mixes_particles_is_refused(lg):
    A, c, _, x = lg
    with pytest.raises(ValueError, match="pass vectorize_particles=False") as info:
        iwae_log_likelihood(
            wm.model_mixing, wm.guide_plate, x, A, c, num_samples=8, vectorize_particles=True
        )
    assert "\n" not in str(info.value)


def test_the_loop_and_the_vectorized_path_agree_on_a_wider_guide(lg):
    """Same estimator, other draws: paired over rows, the difference is Monte Carlo noise."""
    A, c, _, x = lg
    torch.manual_seed(offset_seed(3))
    runs = [
        log_importance_weights(
            wm.model_plate, partial(wm.guide_plate, inflate=1.3), x, A, c, num_samples=1000,
            vectorize_particles=v,
        )
        for v in (True, False)
    ]  # fmt: skip
    exact = wm.exact_log_likelihood(x, A, c)
    for log_w in runs:
        assert_unbiased_log_weights(log_w, exact)


def test_the_ss_vae_and_prodlda_ports_are_estimated(float64):
    """Pyro's SS-VAE M2 without broadcasting MLPs (a particle dimension breaks its
    ``torch.cat``) and ProdLDA (BatchNorm in both networks): finite estimates, one particle
    per call, equal to the vectorized estimate where one exists (the broadcasting SS-VAE)."""
    from outside_models import prodlda, ss_vae

    x, y, _, _ = ss_vae.digits()
    x, y = (x[:6] > 0.5).double(), y[:6].double()
    torch.manual_seed(offset_seed(4))
    for enum in (None, "parallel"):
        net = ss_vae.SSVAE(input_size=64, z_dim=2, hidden_layers=(8,), config_enum=enum).double()
        for args in ((x,), (x, y)):
            est = iwae_log_likelihood(net.model, net.guide, *args, num_samples=20)
            assert est.shape == (6,) and torch.isfinite(est).all()
    docs = prodlda.synthetic_documents(8, vocab_size=12, num_topics=3).double()
    lda = prodlda.ProdLDA(vocab_size=12, num_topics=3, hidden=10, dropout=0.2).double().eval()
    est = iwae_log_likelihood(lda.model, lda.guide, docs, num_samples=20)
    assert est.shape == (8,) and torch.isfinite(est).all()


def test_a_nan_log_density_is_an_error_naming_the_site_and_rows(lg):
    A, c, _, x = lg

    def model(x, A, c):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            bad = torch.arange(x.shape[0]).unsqueeze(-1) == 2
            loc = torch.where(bad, float("nan"), z @ A.T + c)
            pyro.sample("x", dist.Normal(loc, wm.SIGMA).to_event(1), obs=x)

    with pyro.validation_enabled(False), pytest.raises(ValueError) as info:
        iwae_log_likelihood(model, wm.guide_plate, x, A, c, num_samples=4)
    assert "site 'x' is NaN for rows [2]" in str(info.value)
    assert "\n" not in str(info.value)
