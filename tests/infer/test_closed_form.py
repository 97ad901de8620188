"""ClosedFormFit: a one-shot fit behind the trainer's SVI-like interface."""

from __future__ import annotations

import pytest
import torch

from pyro_lvm.infer import ClosedFormFit
from pyro_lvm.models import PPCA, ppca_log_likelihood, ppca_mle


def test_prepare_fits_once_and_step_reports_the_loss(float64):
    x = torch.randn(50, 6) @ torch.randn(6, 6)
    ppca = PPCA(6, 2).double()
    calls = []

    def fit(train_x):
        calls.append(len(train_x))
        ppca.fit_closed_form(train_x)

    inference = ClosedFormFit(fit, ppca.exact_log_likelihood)
    with pytest.raises(RuntimeError, match=r"inference.prepare\(train_x\)"):
        inference.step(x[:10])
    inference.prepare(x)
    inference.prepare(x)  # idempotent
    assert calls == [50]
    before = [p.clone() for p in ppca.parameters()]
    loss = inference.step(x[:10])
    expected = -ppca_log_likelihood(x[:10], ppca_mle(x, 2)).sum().item()
    assert loss == pytest.approx(expected, rel=1e-12)
    assert inference.evaluate_loss(x[:10]) == loss
    assert all(torch.equal(a, b) for a, b in zip(before, ppca.parameters()))
    assert inference.metrics() == {}


def test_restored_state_skips_the_refit():
    inference = ClosedFormFit(lambda x: None, lambda x: -x.sum(-1))
    inference.prepare(torch.ones(2, 2))
    resumed = ClosedFormFit(lambda x: pytest.fail("refit after resume"), lambda x: -x.sum(-1))
    resumed.load_state_dict(inference.state_dict())
    resumed.prepare(torch.ones(2, 2))
    assert resumed.step(torch.ones(3, 2)) == 6.0
