"""FeatureCentering: per-datapoint outputs, running statistics, and its effect on ALD."""

import pytest
import torch
from seeding import offset_seed
from torch import nn

from pyro_lvm.infer import LAE
from pyro_lvm.models import LangevinAutoencoder
from pyro_lvm.models.centering import FeatureCentering
from pyro_lvm.models.likelihoods import GaussianLikelihood


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def features(n=32, d=5, seed=0):
    gen = torch.Generator().manual_seed(offset_seed(seed))
    return 3.0 + 2.0 * torch.rand(n, d, generator=gen)  # positive, far from centred


def test_first_batch_initialises_the_statistics():
    h = features()
    for standardize in (False, True):
        layer = FeatureCentering(5, standardize=standardize)
        out = layer(h)
        torch.testing.assert_close(out.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
        if standardize:
            torch.testing.assert_close(out.var(0), torch.ones(5), atol=1e-4, rtol=0)
        torch.testing.assert_close(layer.running_mean, h.mean(0))
        assert int(layer.num_batches_tracked) == 1


def test_later_rows_depend_on_their_own_input_only_and_statistics_move_by_momentum():
    layer = FeatureCentering(5, momentum=0.25, standardize=True)
    layer(features(seed=0))
    mean0, var0 = layer.running_mean.clone(), layer.running_var.clone()
    h1 = features(seed=1)
    out = layer(h1)
    # uses the statistics from before this batch: row i is a function of h_i alone
    torch.testing.assert_close(out, (h1 - mean0) / torch.sqrt(var0 + layer.eps))
    # the update is pending until the next training batch, which then uses it
    torch.testing.assert_close(layer.pending_mean, 0.75 * mean0 + 0.25 * h1.mean(0))
    torch.testing.assert_close(layer.pending_var, 0.75 * var0 + 0.25 * h1.var(0))
    torch.testing.assert_close(layer.running_mean, mean0)
    h3 = features(seed=3)
    torch.testing.assert_close(
        layer(h3), (h3 - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps)
    )
    torch.testing.assert_close(layer.running_mean, 0.75 * mean0 + 0.25 * h1.mean(0))
    torch.testing.assert_close(layer.running_var, 0.75 * var0 + 0.25 * h1.var(0))
    # another batch sharing row 0: row 0's output depends on the state, not on batch-mates
    layer.eval()
    h2 = torch.cat([h1[:1], features(seed=2)[1:]])
    a, b = layer(h1), layer(h2)
    torch.testing.assert_close(a[0], b[0])
    state = layer.running_mean.clone()
    layer(h2)
    torch.testing.assert_close(layer.running_mean, state)  # eval mode: frozen


@pytest.mark.parametrize("standardize", [False, True])
def test_updates_absorbed_by_the_chain_layer_keep_the_encoders_function(standardize):
    torch.manual_seed(offset_seed(4))
    head = nn.Linear(5, 3)
    layer = FeatureCentering(5, momentum=0.5, standardize=standardize).compensate(head)
    encoder = nn.Sequential(layer, head)
    probe = features(seed=5)
    encoder(features(seed=0))  # initialisation: the function is defined from here on
    encoder.eval()
    before = encoder(probe)
    encoder.train()
    for k in range(1, 4):  # batches far from each other: the statistics move a lot
        h = features(seed=10 + k) * (1 + k)
        out = encoder(h)
        # every training batch is computed with one consistent set of statistics
        encoder.eval()
        torch.testing.assert_close(out, encoder(h))
        torch.testing.assert_close(encoder(probe), before)
        encoder.train()
    assert not torch.allclose(layer.running_mean, features(seed=0).mean(0))
    with pytest.raises(ValueError, match="bias"):
        FeatureCentering(5).compensate(nn.Linear(5, 3, bias=False))


def test_a_checkpoint_without_pending_statistics_loads_with_none_pending():
    layer = FeatureCentering(5)
    layer(features(seed=0))
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("pending")}
    fresh = FeatureCentering(5)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.pending_mean, layer.running_mean)


def test_gradient_flows_to_the_features_not_the_statistics():
    layer = FeatureCentering(5, standardize=True)
    layer(features(seed=0))
    var_before = layer.running_var.clone()
    h = features(seed=1).requires_grad_()
    layer(h).sum().backward()
    # d/dh sum((h - m) / s) = 1 / s with the statistics used in the forward pass
    torch.testing.assert_close(h.grad, torch.rsqrt(var_before + layer.eps).expand(32, 5))
    assert not layer.running_mean.requires_grad and layer.running_mean.grad is None


def test_bad_input():
    with pytest.raises(ValueError, match="num_features"):
        FeatureCentering(0)
    with pytest.raises(ValueError, match="momentum"):
        FeatureCentering(3, momentum=0.0)
    with pytest.raises(ValueError, match="feature_norm"):
        LangevinAutoencoder(6, 2, feature_norm="whiten")
    with pytest.raises(ValueError, match="default MLP encoder"):
        LangevinAutoencoder(6, 2, feature_norm="center", encoder=nn.Linear(6, 2))


def make_lae(feature_norm, seed=0):
    torch.manual_seed(offset_seed(seed))
    lvm = LangevinAutoencoder(
        6,
        2,
        hidden_dim=48,
        depth=1,
        likelihood=GaussianLikelihood(scale=0.1),
        feature_norm=feature_norm,
    )
    optim = torch.optim.Adam(lvm.parameters(), lr=1e-3)
    return lvm, LAE(lvm.model, lvm.encoder, optim)


def test_centred_encoder_keeps_the_chain_layer_last_and_conditions_the_chain_better():
    gen = torch.Generator().manual_seed(offset_seed(3))
    x = torch.tanh(torch.randn(32, 2, generator=gen) @ torch.randn(2, 6, generator=gen))
    step = {}
    for norm in ("none", "center"):
        lvm, lae = make_lae(norm)
        assert isinstance(lvm.encoder[-1], nn.Linear)
        assert isinstance(lvm.encoder[-2], FeatureCentering) == (norm == "center")
        lae.step(x)
        assert lae.kernel.chain_params == [lvm.encoder[-1].weight]
        step[norm] = lae.kernel.state.step_size
        if norm == "center":
            assert "encoder.2.running_mean" in lvm.state_dict()
            # the chain sees centred features (the mean is from before one optimizer step)
            lvm.eval()
            with torch.no_grad():
                raw = nn.Sequential(*list(lvm.encoder)[:-2])(x)
                (g,) = lae.kernel.bind(x).chain.features
            assert g.mean(0).norm() < 0.05 * raw.mean(0).norm()
            # the chain's potential is quadratic in the last-layer weight with curvature
            # set by the features' Gram matrix; centring by the mean m subtracts
            # n mu mu^T and adds n (mu - m)(mu - m)^T (|mu - m| < 0.05 |mu| above), so its
            # largest eigenvalue, which caps the MALA step, falls (measured ~0.5x here)
            top_raw = torch.linalg.eigvalsh(raw.T @ raw)[-1]
            top_centred = torch.linalg.eigvalsh(g.T @ g)[-1]
            assert top_centred < top_raw, (top_centred, top_raw)
    assert step["center"] > 0 and step["none"] > 0
