"""``pyro-lvm train dlgm`` recipe: builds, trains, checkpoints and evaluates."""

from __future__ import annotations

import math

import torch

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.evaluation import evaluate
from pyro_lvm.experiments.recipes import get_recipe
from pyro_lvm.infer import DLGM, LangevinProposalGuide
from pyro_lvm.models import make_likelihood


def _build(**overrides):
    config = TrainConfig(model="dlgm", latent_dim=2, hidden_dim=16, depth=1, **overrides)
    return get_recipe("dlgm").build(config, 12, make_likelihood("bernoulli"))


def test_dlgm_recipe_trains_and_evaluates():
    torch.set_num_threads(1)
    exp = _build()
    assert isinstance(exp.inference, DLGM)
    assert exp.inference.step_size == 0.005 and exp.inference.mh
    x = torch.randint(0, 2, (40, 12)).float()
    losses = [exp.inference.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    metrics = exp.inference.metrics()
    assert set(metrics) == {"accept_rate", "step_size"}
    out = evaluate(exp, x[:10], eval_samples=8, eval_ais=3)
    for key in ("test_nelbo", "test_nll", "test_nll_ais"):
        assert math.isfinite(out[key])


def test_dlgm_recipe_refined_eval_guide():
    torch.set_num_threads(1)
    exp = _build(refine_steps=4, step_size=0.01, mh=False, adapt_step_size=False)
    assert isinstance(exp.guide, LangevinProposalGuide)
    assert not exp.inference.mh and not exp.inference.adapt_step_size
    x = torch.randint(0, 2, (10, 12)).float()
    out = evaluate(exp, x, eval_samples=8)
    assert math.isfinite(out["test_nll"]) and out["test_nll"] <= out["test_nelbo"] + 1e-4
