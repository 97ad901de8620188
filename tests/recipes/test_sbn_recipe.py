"""The ``sbn`` recipe: every ``--estimator`` builds, trains on changing batch sizes, resumes."""

import pytest
import torch
from seeding import offset_seed

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes import get_recipe
from pyro_lvm.experiments.recipes.sbn import ESTIMATORS
from pyro_lvm.infer import iwae_log_likelihood
from pyro_lvm.models import BernoulliLikelihood, SigmoidBeliefNet


def _config(**kw):
    base = dict(model="sbn", latent_dim=6, hidden_dim=8, depth=1, num_layers=2, lr=1e-2)
    return TrainConfig(**{**base, **kw})


def _data(n=12, d=10):
    return torch.bernoulli(
        torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(offset_seed(0))
    )


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_every_estimator_trains_with_changing_batch_sizes(estimator):
    layers = 1 if estimator == "disarm" else 2
    config = _config(
        estimator=estimator,
        num_particles=3 if estimator == "vimco" else 1,
        num_layers=layers,
    )
    exp = get_recipe("sbn").build(config, 10, BernoulliLikelihood())
    assert isinstance(exp.lvm, SigmoidBeliefNet) and exp.lvm.num_layers == layers
    assert exp.pass_index and not exp.continuous_latents
    x = _data()
    before = [p.detach().clone() for p in exp.lvm.parameters()]
    for rows in (slice(0, 5), slice(5, 12), slice(0, 3)):  # batch sizes 5, 7, 3
        idx = torch.arange(12)[rows]
        loss = exp.inference.step(x[idx], idx)
        assert loss > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, exp.lvm.parameters()))
    assert exp.inference.evaluate_loss(x) > 0
    assert iwae_log_likelihood(exp.lvm.model, exp.guide, x, num_samples=10).shape == (12,)


def test_nvil_state_round_trips_through_the_modules():
    exp = get_recipe("sbn").build(_config(), 10, BernoulliLikelihood())
    x = _data()
    exp.inference.step(x, torch.arange(12))
    state = exp.modules.state_dict()
    assert any("baselines" in k and k.endswith("average") for k in state)
    fresh = get_recipe("sbn").build(_config(), 10, BernoulliLikelihood())
    fresh.modules.load_state_dict(state)
    for key, value in fresh.modules.state_dict().items():
        assert torch.equal(value, state[key]), key
    # the neural baselines are optimised with the model
    optimised = {id(p) for g in exp.inference.optim.param_groups for p in g["params"]}
    assert all(id(p) in optimised for p in exp.modules["baselines"].parameters())


def test_bad_estimator_settings():
    build = get_recipe("sbn").build
    with pytest.raises(ValueError, match="--num-particles >= 2"):
        build(_config(estimator="vimco", num_particles=1), 10, BernoulliLikelihood())
    with pytest.raises(ValueError, match="--num-layers 1"):
        build(_config(estimator="disarm", num_layers=2), 10, BernoulliLikelihood())
    with pytest.raises(ValueError, match="unknown estimator"):
        build(_config(estimator="rebar"), 10, BernoulliLikelihood())
