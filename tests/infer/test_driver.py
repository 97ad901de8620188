"""The optimizer-driver base: one step, refusal of a non-finite loss before any update,
gradient clipping, and optimizer state round trips, for every driver built on it."""

import copy

import pytest
import torch

from pyro_lvm.infer.autoencoder import AutoencoderFit
from pyro_lvm.infer.diagnostics import DivergenceError
from pyro_lvm.infer.dlgm import DLGM
from pyro_lvm.infer.driver import OptimizerDriver
from pyro_lvm.infer.lae import LAE
from pyro_lvm.infer.marginal import MarginalLikelihoodGD
from pyro_lvm.infer.svi import ModuleSVI


class Quadratic(OptimizerDriver):
    """loss = scale * sum((w - 3)^2): the smallest possible driver."""

    def __init__(self, w, optim, scale=1.0, **kw):
        super().__init__(optim, **kw)
        self.w, self.scale = w, scale

    def objective(self, x):
        return self.scale * ((self.w - 3.0) ** 2).sum() + 0.0 * x.sum()


def _driver(scale=1.0, clip_norm=None, lr=0.1):
    w = torch.nn.Parameter(torch.zeros(4))
    return Quadratic(w, torch.optim.SGD([w], lr=lr), scale=scale, clip_norm=clip_norm), w


def test_step_descends_and_reports_the_loss_before_the_step():
    d, w = _driver()
    loss = d.step(torch.zeros(2))
    assert loss == pytest.approx(36.0)  # 4 * 3^2 at w = 0
    assert torch.allclose(w.detach(), torch.full((4,), 0.6))  # w - lr * 2 (w - 3)
    assert d.grad_norm != d.grad_norm  # NaN: not computed without clipping (a cost)
    d.track_grad_norm = True
    d.step(torch.zeros(2))
    assert d.grad_norm == pytest.approx(2 * 2.4 * 2)  # |2 (0.6 - 3)| * sqrt(4)


def test_clip_norm_bounds_the_update():
    d, w = _driver(clip_norm=1.0, lr=1.0)
    d.step(torch.zeros(2))
    assert w.detach().norm() == pytest.approx(1.0, rel=1e-6)
    assert d.grad_norm == pytest.approx(12.0)  # recorded before clipping


def test_non_finite_loss_raises_before_any_parameter_moves():
    d, w = _driver(scale=float("nan"))
    # NaN before any update: the model's output, not the learning rate, is named
    with pytest.raises(DivergenceError, match="not finite at the first step, before any update"):
        d.step(torch.zeros(2))
    assert torch.equal(w.detach(), torch.zeros(4))
    d, w = _driver()
    d.step(torch.zeros(2))
    moved = w.detach().clone()
    d.scale = float("nan")  # after an update: the step may have diverged
    with pytest.raises(DivergenceError, match="lower the learning rate"):
        d.step(torch.zeros(2))
    assert torch.equal(w.detach(), moved)
    x = torch.zeros(3, 2)
    x[2, 1] = float("inf")  # non-finite data are named as such
    with pytest.raises(DivergenceError, match=r"argument 0 of step\(\) holds 1 NaN or infinite"):
        _driver()[0].step(x)


def test_state_round_trip_continues_identically():
    w1 = torch.nn.Parameter(torch.zeros(4))
    d1 = Quadratic(w1, torch.optim.Adam([w1], lr=0.1))
    for _ in range(3):
        d1.step(torch.zeros(1))
    w2 = torch.nn.Parameter(w1.detach().clone())
    d2 = Quadratic(w2, torch.optim.Adam([w2], lr=0.1))
    # a copy, as a checkpoint is: torch's load_state_dict shares the state tensors
    d2.load_state_dict(copy.deepcopy(d1.state_dict()))
    d1.step(torch.zeros(1))
    d2.step(torch.zeros(1))
    assert torch.equal(w1.detach(), w2.detach())


def test_impossible_clip_norm_is_one_line():
    with pytest.raises(ValueError, match="clip_norm must be positive"):
        _driver(clip_norm=0.0)


@pytest.mark.parametrize("cls", [ModuleSVI, AutoencoderFit, MarginalLikelihoodGD, LAE, DLGM])
def test_the_drivers_share_the_base(cls):
    assert issubclass(cls, OptimizerDriver)
    own = {"step", "state_dict", "load_state_dict", "_descend"} & set(vars(cls))
    assert not own - {"step"}  # the update and the state live in the base
