"""Convolutional encoders/decoders: shapes for 8x8, 28x28x1, 32x32x3; drop-in for models."""

from __future__ import annotations

import pytest
import torch
from seeding import offset_seed
from torch import nn

from pyro_lvm.infer import elbo_per_datapoint
from pyro_lvm.models import VAE, ConvDecoder, ConvEncoder, GaussianHead, LangevinAutoencoder
from pyro_lvm.models.conv import image_shape_for


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_shapes_with_particle_dims(shape, layer_norm):
    torch.manual_seed(offset_seed(0))
    d = shape[0] * shape[1] * shape[2]
    enc = ConvEncoder(shape, 10, hidden_dim=32, channels=8, layer_norm=layer_norm)
    dec = ConvDecoder(4, shape, hidden_dim=32, channels=8, layer_norm=layer_norm)
    assert isinstance(enc[-1], nn.Linear) and enc.head is enc[-1]
    x = torch.rand(3, 5, d)  # particles x batch x pixels
    assert enc(x).shape == (3, 5, 10)
    assert enc.trunk(x).shape == (15, 32)
    assert dec(torch.randn(3, 5, 4)).shape == (3, 5, d)
    assert dec(torch.randn(7, 4)).shape == (7, d)
    # the reshape keeps datapoints apart: row i of the output depends on row i only
    y = enc(x[0])
    assert torch.allclose(enc(x[0, :2]), y[:2], atol=1e-5)


def test_orthogonal_init():
    enc = ConvEncoder((1, 8, 8), 4, hidden_dim=16, channels=4, orthogonal_init=True)
    for m in enc.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight.reshape(m.weight.shape[0], -1)
            small = w if w.shape[0] <= w.shape[1] else w.T
            assert torch.allclose(small @ small.T, torch.eye(small.shape[0]), atol=1e-5)
            assert bool((m.bias == 0).all())


def test_models_take_conv_nets():
    torch.manual_seed(offset_seed(0))
    shape, z = (1, 8, 8), 3
    vae = VAE(
        64,
        z,
        encoder=GaussianHead(ConvEncoder(shape, 2 * z, hidden_dim=16, channels=4), z),
        decoder=ConvDecoder(z, shape, hidden_dim=16, channels=4),
    )
    x = torch.bernoulli(torch.full((6, 64), 0.5))
    assert elbo_per_datapoint(vae.model, vae.guide, x, num_samples=4).shape == (6,)
    lae = LangevinAutoencoder(
        64,
        z,
        encoder=ConvEncoder(shape, z, hidden_dim=16, channels=4),
        decoder=ConvDecoder(z, shape, hidden_dim=16, channels=4),
    )
    assert lae.encode(x).shape == (6, z)


def test_image_shape_for():
    assert image_shape_for(784) == (1, 28, 28)
    assert image_shape_for(3072) == (3, 32, 32)
    assert image_shape_for(625, (25, 25)) == (1, 25, 25)
    with pytest.raises(ValueError, match="--arch mlp"):
        image_shape_for(10)
    with pytest.raises(ValueError, match="does not describe"):
        image_shape_for(64, (1, 7, 7))
    with pytest.raises(ValueError, match="divisible"):
        ConvEncoder((1, 25, 25), 4)
