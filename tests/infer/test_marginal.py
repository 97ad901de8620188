"""Gradient descent on an exact marginal likelihood (MarginalLikelihoodGD)."""

from __future__ import annotations

import math

import pytest
import torch
from seeding import offset_seed
from sklearn.datasets import load_digits
from torch import nn

from pyro_lvm.infer import DivergenceError, MarginalLikelihoodGD
from pyro_lvm.models import PPCA, ppca_log_likelihood, ppca_mle


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class GaussianMean(nn.Module):
    """x ~ N(m, exp(2 s) I): log p(x) in closed form; the MLE is the sample mean/variance."""

    def __init__(self, dim: int):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(dim))
        self.s = nn.Parameter(torch.zeros(()))

    def exact_log_likelihood(self, x):
        return torch.distributions.Normal(self.m, self.s.exp()).log_prob(x).sum(-1)


def test_step_is_one_gradient_step_on_the_negative_log_likelihood(float64):
    x = torch.randn(10, 3) + 2
    model = GaussianMean(3)
    gd = MarginalLikelihoodGD(
        model.exact_log_likelihood, torch.optim.SGD(model.parameters(), 0.01)
    )
    loss = gd.step(x)
    # at m = 0, s = 0: -sum log p = 0.5 * sum x^2 + N D log sqrt(2 pi);
    # d/dm = -sum_n x_n, d/ds = N D - sum x^2
    assert loss == pytest.approx((0.5 * x.pow(2).sum() + 30 * 0.5 * math.log(2 * math.pi)).item())
    torch.testing.assert_close(model.m.detach(), 0.01 * x.sum(0))
    torch.testing.assert_close(model.s.detach(), -0.01 * (30 - x.pow(2).sum()))
    assert gd.metrics()["grad_norm"] == pytest.approx(
        math.sqrt(x.sum(0).pow(2).sum().item() + (30 - x.pow(2).sum().item()) ** 2)
    )
    assert gd.evaluate_loss(x) < loss


def test_converges_to_the_mle_of_a_gaussian(float64):
    x = torch.randn(200, 4) * 3 + 1
    model = GaussianMean(4)
    gd = MarginalLikelihoodGD(
        model.exact_log_likelihood, torch.optim.Adam(model.parameters(), 0.05)
    )
    for _ in range(1500):
        gd.step(x)
    torch.testing.assert_close(model.m.detach(), x.mean(0), rtol=0, atol=1e-6)
    var_mle = x.var(0, unbiased=False).mean()  # one shared variance
    torch.testing.assert_close((2 * model.s.detach()).exp(), var_mle, rtol=1e-6, atol=0)


def test_ppca_gradient_descent_reaches_closed_form(float64):
    """Full-batch Adam on the exact likelihood of digits / 16, q = 5: no guide, no ELBO gap,
    so the only gap is optimisation (measured ~1e-5 nats/image)."""
    x = torch.tensor(load_digits().data) / 16
    best = ppca_log_likelihood(x, ppca_mle(x, 5)).mean().item()
    ppca = PPCA(64, 5).double()
    generative = [*ppca.decoder.parameters(), *ppca.likelihood.parameters()]
    optim = torch.optim.Adam(generative, lr=0.03)
    gd = MarginalLikelihoodGD(ppca.exact_log_likelihood, optim)
    for lr, steps in [(0.03, 250), (0.003, 100)]:
        optim.param_groups[0]["lr"] = lr
        for _ in range(steps):
            loss = gd.step(x)
    reached = ppca.exact_log_likelihood(x).mean().item()
    assert -loss / len(x) <= best + 1e-9 and reached <= best + 1e-9
    assert best - reached < 1e-3


def test_state_dict_resume_is_exact(float64):
    x = torch.randn(30, 3)

    def make():
        torch.manual_seed(offset_seed(0))
        model = GaussianMean(3)
        gd = MarginalLikelihoodGD(
            model.exact_log_likelihood, torch.optim.Adam(model.parameters(), 0.1)
        )
        return model, gd

    ref_model, ref = make()
    for _ in range(6):
        ref.step(x)
    model, gd = make()
    for _ in range(3):
        gd.step(x)
    saved = {"model": model.state_dict(), "gd": gd.state_dict()}
    model2, gd2 = make()
    model2.load_state_dict(saved["model"])
    gd2.load_state_dict(saved["gd"])
    for _ in range(3):
        gd2.step(x)
    for a, b in zip(model2.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_accepts_a_model_with_exact_log_likelihood():
    x = torch.randn(10, 3)
    models = [GaussianMean(3), GaussianMean(3)]
    losses = [
        MarginalLikelihoodGD(m, torch.optim.SGD(m.parameters(), 0.1)).step(x) for m in models
    ]
    assert losses[0] == losses[1]
    sgd = [torch.optim.SGD(m.parameters(), 0.1) for m in models]
    gd = MarginalLikelihoodGD(models[0].exact_log_likelihood, sgd[0])
    gd2 = MarginalLikelihoodGD(models[1], sgd[1])
    assert gd.evaluate_loss(x) == gd2.evaluate_loss(x)


def test_clip_norm_bounds_the_update():
    x = torch.full((10, 3), 100.0)
    model = GaussianMean(3)
    gd = MarginalLikelihoodGD(
        model.exact_log_likelihood, torch.optim.SGD(model.parameters(), 1.0), clip_norm=1.0
    )
    gd.step(x)
    assert gd.metrics()["grad_norm"] > 1.0
    assert torch.cat([model.m.detach(), model.s.detach()[None]]).norm() <= 1.0 + 1e-6


def test_bad_input():
    model = GaussianMean(3)
    optim = torch.optim.SGD(model.parameters(), 0.1)
    with pytest.raises(ValueError, match="callable"):
        MarginalLikelihoodGD(3.0, optim)
    gd = MarginalLikelihoodGD(lambda x: model.exact_log_likelihood(x).sum(), optim)
    with pytest.raises(ValueError, match="one value per datapoint"):
        gd.step(torch.randn(4, 3))
    gd = MarginalLikelihoodGD(lambda x: model.exact_log_likelihood(x) * float("nan"), optim)
    with pytest.raises(DivergenceError, match="not finite at the first step, before any update"):
        gd.step(torch.randn(4, 3))
    assert not torch.isnan(model.m).any()
