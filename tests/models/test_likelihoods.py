import math

import pytest
import torch

from pyro_lvm.models.likelihoods import (
    BernoulliLikelihood,
    DiscretizedLogistic,
    DiscretizedLogisticLikelihood,
    GaussianLikelihood,
    make_likelihood,
)

GRID = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1


@pytest.mark.parametrize("loc", [-1.5, -0.99, 0.0, 0.3, 1.0, 3.0])
@pytest.mark.parametrize("scale", [1e-4, 0.01, 0.1, 2.0])
def test_discretized_logistic_normalised_and_finite(loc, scale, float64):
    d = DiscretizedLogistic(torch.tensor(loc), torch.tensor(scale))
    lp = d.log_prob(GRID)
    assert torch.isfinite(lp).all()
    assert abs(lp.logsumexp(0).item()) < 1e-9


def test_discretized_logistic_matches_cdf_differences(float64):
    loc, scale = torch.tensor(0.2), torch.tensor(0.3)
    half = 1 / 255
    cdf = lambda v: torch.sigmoid((v - loc) / scale)  # noqa: E731
    expected = cdf(GRID + half) - cdf(GRID - half)
    expected[0] = cdf(GRID[0] + half)
    expected[-1] = 1 - cdf(GRID[-1] - half)
    lp = DiscretizedLogistic(loc, scale).log_prob(GRID)
    assert torch.allclose(lp.exp(), expected, rtol=1e-10, atol=1e-14)


def test_discretized_logistic_sample_on_grid_and_mean():
    d = DiscretizedLogistic(torch.full((20000,), 0.1), torch.tensor(0.05))
    x = d.sample()
    k = (x + 1) * 255 / 2
    assert torch.allclose(k, k.round(), atol=1e-4)
    # logistic std = s * pi / sqrt(3); the rounding adds at most half a bin of bias
    se = 0.05 * math.pi / math.sqrt(3) / math.sqrt(20000)
    assert abs(x.mean().item() - 0.1) < 5 * se + 1 / 255


def test_likelihoods_are_distributions_with_event_dim():
    params = torch.zeros(3, 5)
    for lik in (BernoulliLikelihood(), GaussianLikelihood(), DiscretizedLogisticLikelihood()):
        d = lik(params)
        assert d.batch_shape == (3,) and d.event_shape == (5,)


def test_gaussian_likelihood_log_prob(float64):
    lik = GaussianLikelihood(scale=0.5, learn_scale=False)
    x = torch.randn(4, 3)
    expected = torch.distributions.Normal(0.0, 0.5).log_prob(x).sum(-1)
    assert torch.allclose(lik(torch.zeros(4, 3)).log_prob(x), expected)
    assert not list(lik.parameters())
    assert len(list(GaussianLikelihood().parameters())) == 1


@pytest.mark.parametrize(
    "lik,x,match",
    [
        (BernoulliLikelihood(), torch.tensor([[0.0, 2.0]]), r"\[0, 1\]"),
        (BernoulliLikelihood(), torch.tensor([[0.0, float("nan")]]), "NaN"),
        (GaussianLikelihood(), torch.tensor([[float("inf")]]), "NaN or infinite"),
        (DiscretizedLogisticLikelihood(), torch.tensor([[0.0, 1.5]]), r"\[-1, 1\]"),
        (DiscretizedLogisticLikelihood(), torch.tensor([[0.001]]), "grid"),
    ],
)
def test_bad_data_one_line_errors(lik, x, match):
    with pytest.raises(ValueError, match=match) as info:
        lik.check_data(x)
    assert "\n" not in str(info.value)


def test_bad_likelihood_settings():
    with pytest.raises(ValueError, match="unknown likelihood"):
        make_likelihood("mse")
    with pytest.raises(ValueError, match="positive"):
        GaussianLikelihood(scale=0.0)


def test_discretized_logistic_gradients_finite_float32():
    loc = torch.linspace(-3, 30, 200).unsqueeze(-1).requires_grad_()
    log_scale = torch.tensor(-2.0, requires_grad=True)
    grid = GRID.float()
    lp = DiscretizedLogistic(loc, log_scale.exp().expand(loc.shape)).log_prob(grid)
    lp.sum().backward()
    assert torch.isfinite(lp).all()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad)
