"""Config fields shared by the vae/dlgm/lae recipes: orthogonal_init, feature_norm."""

import pytest
import torch
from seeding import offset_seed
from torch import nn

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes import get_recipe
from pyro_lvm.models.centering import FeatureCentering
from pyro_lvm.models.likelihoods import make_likelihood


@pytest.mark.parametrize("model", ["vae", "dlgm", "lae"])
@pytest.mark.parametrize("orthogonal", [False, True])
def test_orthogonal_init_reaches_every_linear_layer(model, orthogonal):
    torch.manual_seed(offset_seed(0))
    config = TrainConfig(model=model, hidden_dim=32, depth=2, orthogonal_init=orthogonal)
    exp = get_recipe(model).build(config, 64, make_likelihood("logistic"))
    linears = [m for m in exp.modules.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6
    for m in linears:
        w = m.weight.detach()
        small = w if w.shape[0] <= w.shape[1] else w.T  # orthonormal rows of the short side
        is_orthogonal = torch.allclose(small @ small.T, torch.eye(small.shape[0]), atol=1e-5)
        assert is_orthogonal == orthogonal
        assert bool((m.bias == 0).all()) == orthogonal


def test_lae_recipe_feature_norm():
    config = TrainConfig(model="lae", hidden_dim=32, depth=2, feature_norm="standardize")
    exp = get_recipe("lae").build(config, 64, make_likelihood("logistic"))
    centering = exp.lvm.encoder[-2]
    assert isinstance(centering, FeatureCentering) and centering.standardize
    assert isinstance(exp.lvm.encoder[-1], nn.Linear)
    spec = exp.inference.kernel.chain_spec(torch.rand(5, 64))  # found on a batch
    assert spec.params == (exp.lvm.encoder[-1].weight,)
    default = get_recipe("lae").build(TrainConfig(model="lae"), 64, make_likelihood("logistic"))
    # centring is the default: without it the chain freezes (docs/langevin.md)
    assert sum(isinstance(m, FeatureCentering) for m in default.lvm.modules()) == 1
    plain = TrainConfig(model="lae", feature_norm="none")
    plain_exp = get_recipe("lae").build(plain, 64, make_likelihood("logistic"))
    assert not any(isinstance(m, FeatureCentering) for m in plain_exp.lvm.modules())


def test_bad_feature_norm():
    with pytest.raises(ValueError, match="--feature-norm"):
        TrainConfig(feature_norm="whiten").validate()
