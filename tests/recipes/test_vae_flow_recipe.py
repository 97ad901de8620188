"""The vae-flow recipe and --arch conv for the vae, vae-flow, dlgm and lae recipes."""

from __future__ import annotations

import pytest
import torch
from seeding import offset_seed
from torch import nn

from pyro_lvm.data import load_digits
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.evaluation import evaluate
from pyro_lvm.experiments.recipes import get_recipe, model_flags
from pyro_lvm.experiments.trainer import Trainer
from pyro_lvm.models import ConvDecoder, ConvEncoder, FeatureCentering, VAEFlow
from pyro_lvm.models.likelihoods import make_likelihood


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _config(model: str, **settings) -> TrainConfig:
    config = TrainConfig(model=model, latent_dim=4, hidden_dim=32, depth=1, batch_size=100)
    for key, value in settings.items():  # fields the CLI may not declare yet
        setattr(config, key, value)
    return config


def test_vae_flow_recipe_trains_and_round_trips():
    torch.manual_seed(offset_seed(0))
    config = _config("vae-flow", num_flows=3)
    data = load_digits().for_likelihood("bernoulli")
    exp = get_recipe("vae-flow").build(config, data.data_dim, make_likelihood("bernoulli"))
    assert isinstance(exp.lvm, VAEFlow) and len(exp.lvm.flows) == 3
    assert {"num_flows", "flow", "arch"} <= model_flags("vae-flow")
    test_x = data.test_x[:100]
    before = evaluate(exp, test_x, eval_samples=20)
    Trainer(exp, data, batch_size=config.batch_size).fit(3)
    after = evaluate(exp, test_x, eval_samples=20)
    assert after["test_nll"] < before["test_nll"] - 5.0
    # a fresh build loads the checkpointed state and gives the same bound
    torch.manual_seed(offset_seed(1))
    again = get_recipe("vae-flow").build(config, data.data_dim, make_likelihood("bernoulli"))
    again.modules.load_state_dict(exp.modules.state_dict())
    torch.manual_seed(offset_seed(2))
    a = evaluate(exp, test_x, eval_samples=5)["test_nelbo"]
    torch.manual_seed(offset_seed(2))
    b = evaluate(again, test_x, eval_samples=5)["test_nelbo"]
    assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("model", ["vae", "vae-flow", "dlgm", "lae"])
def test_conv_arch_reaches_every_recipe(model):
    torch.manual_seed(offset_seed(0))
    config = _config(model, arch="conv")
    data = load_digits().for_likelihood("bernoulli")
    exp = get_recipe(model).build(config, data.data_dim, make_likelihood("bernoulli"))
    assert isinstance(exp.lvm.decoder, ConvDecoder)
    convs = [m for m in exp.lvm.encoder.modules() if isinstance(m, ConvEncoder)]
    assert len(convs) == 1 and isinstance(convs[0][-1], nn.Linear)
    if model == "lae":  # the chain is the conv encoder's final Linear, centred features
        spec = exp.inference.kernel.chain_spec(data.train_x[:5])  # found on a batch
        assert spec.params == (convs[0][-1].weight,)
        assert isinstance(convs[0][-2], FeatureCentering)
        assert exp.lvm.feature_norm == config.feature_norm
    x = torch.bernoulli(data.train_x[:20])  # below the hidden width: ALD's rank condition
    loss = exp.inference.step(x)
    assert torch.isfinite(torch.tensor(loss))


def test_bad_arch():
    config = _config("vae", arch="resnet")
    with pytest.raises(ValueError, match="--arch"):
        get_recipe("vae").build(config, 64, make_likelihood("bernoulli"))
    with pytest.raises(ValueError, match="--arch mlp"):
        get_recipe("vae").build(_config("vae", arch="conv"), 10, make_likelihood("bernoulli"))
