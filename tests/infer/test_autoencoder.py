import pytest
import torch
from seeding import offset_seed

from pyro_lvm.infer import AutoencoderFit, DivergenceError
from pyro_lvm.models import AEGMM, GaussianLikelihood


def _fit(**kwargs):
    torch.manual_seed(offset_seed(0))
    ae = AEGMM(5, 2, num_components=2, hidden_dim=8, likelihood=GaussianLikelihood())
    return ae, AutoencoderFit(
        ae.reconstruction_log_prob, torch.optim.SGD(ae.parameters(), lr=1e-3), **kwargs
    )


def test_step_returns_batch_summed_reconstruction_loss_before_the_update():
    ae, fit = _fit()
    x = torch.randn(7, 5)
    expected = -ae.likelihood(ae.decoder(ae.encoder(x))).log_prob(x).sum().item()
    assert fit.evaluate_loss(x) == pytest.approx(expected, rel=1e-6)
    assert fit.step(x) == pytest.approx(expected, rel=1e-6)
    assert fit.evaluate_loss(x) < expected  # a small SGD step on this batch descends


def test_non_finite_loss_raises_before_the_update():
    ae, fit = _fit()
    before = [p.detach().clone() for p in ae.parameters()]
    x = torch.randn(4, 5)
    x[0, 0] = float("nan")
    with pytest.raises(DivergenceError, match="reconstruction loss"):
        fit.step(x)
    assert all(torch.equal(a, b) for a, b in zip(before, ae.parameters()))


def test_finalize_metrics_and_state_round_trip():
    calls = []

    def finalize(train_x):
        calls.append(train_x.shape)
        return {"gmm_code_log_lik": torch.tensor(-1.5)}

    _, fit = _fit(finalize=finalize)
    assert fit.metrics() == {}
    fit.finalize(torch.zeros(10, 5))
    assert calls == [(10, 5)] and fit.metrics() == {"gmm_code_log_lik": -1.5}
    _, other = _fit()
    other.load_state_dict(fit.state_dict())
    assert other.metrics() == {"gmm_code_log_lik": -1.5}
    other.finalize(torch.zeros(3, 5))  # no finalize callable: a no-op
    assert other.metrics() == {"gmm_code_log_lik": -1.5}
