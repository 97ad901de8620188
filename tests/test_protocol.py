"""The model protocol of the experiment layer: the ready models implement it, and the
layer's checks name exactly what a model lacks."""

import pytest
import torch
from torch import nn

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.protocol import (
    GenerativeModel,
    PlottableModel,
    TrainableModel,
    members,
    missing,
)
from pyro_lvm.experiments.recipes import get_recipe
from pyro_lvm.models.likelihoods import make_likelihood

READY = {
    "vae": "bernoulli",
    "vae-flow": "bernoulli",
    "lae": "bernoulli",
    "dlgm": "bernoulli",
    "sbn": "bernoulli",
    "ae-gmm": "bernoulli",
    "ppca": "gaussian",
}


@pytest.mark.parametrize("name", sorted(READY))
def test_every_ready_model_implements_the_protocols(name):
    lvm = get_recipe(name).build(TrainConfig(model=name), 64, make_likelihood(READY[name])).lvm
    for protocol in (TrainableModel, GenerativeModel, PlottableModel):
        assert isinstance(lvm, protocol), (name, protocol.__name__, missing(lvm, protocol))
    assert lvm.generate(3).shape == (3, 64)


def test_protocol_members_are_what_the_docs_list():
    assert members(TrainableModel) == ["guide", "model", "parameters", "state_dict"]
    assert members(GenerativeModel) == ["generate"]
    assert members(PlottableModel) == ["decoder", "encode", "likelihood", "reconstruct"]


class OnlyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def model(self, x):
        pass


def test_missing_names_what_a_model_lacks():
    m = OnlyModel()
    assert missing(m, TrainableModel) == ["guide"]
    assert not isinstance(m, TrainableModel)
    assert missing(m, PlottableModel) == ["decoder", "encode", "likelihood", "reconstruct"]
