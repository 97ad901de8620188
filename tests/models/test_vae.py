import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from seeding import offset_seed

from pyro_lvm.infer import ModuleSVI, elbo_per_datapoint
from pyro_lvm.models import MLP, VAE, GaussianLikelihood


def test_mlp_structure():
    net = MLP(5, 3, hidden_dim=7, depth=2, layer_norm=True, orthogonal_init=True)
    assert isinstance(net.head, torch.nn.Linear) and net.head.out_features == 3
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in net) == 2
    assert net.trunk(torch.zeros(2, 5)).shape == (2, 7)
    w = net[0].weight
    assert torch.allclose(w.T @ w, torch.eye(5), atol=1e-5)  # orthonormal columns


@pytest.mark.parametrize(
    "kwargs,match", [({"latent_dim": 0}, "latent_dim"), ({"latent_dim": -2}, "latent_dim")]
)
def test_bad_latent_dim(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAE(4, **kwargs)


def test_model_shapes_with_particle_dims():
    vae = VAE(6, 2, hidden_dim=8)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    assert elbo_per_datapoint(vae.model, vae.guide, x, num_samples=7).shape == (5,)
    with pytest.raises(ValueError, match="shape"):
        vae.check_data(torch.zeros(5, 7))


def test_svi_elbo_matches_evaluator_and_trains():
    torch.manual_seed(offset_seed(0))
    vae = VAE(6, 2, hidden_dim=16, likelihood=GaussianLikelihood())
    x = torch.randn(32, 6) * torch.tensor([3.0, 1, 1, 1, 1, 0.1])
    loss = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        est = loss.loss(vae.model, vae.guide, x)
        ref = -elbo_per_datapoint(vae.model, vae.guide, x, num_samples=4000).sum().item()
    assert abs(est - ref) / abs(ref) < 0.01
    svi = ModuleSVI(
        vae.model, vae.guide, torch.optim.Adam(vae.parameters(), 1e-2), loss=TraceMeanField_ELBO()
    )
    first = svi.evaluate_loss(x)
    for _ in range(200):
        svi.step(x)
    assert svi.evaluate_loss(x) < first - 0.2 * abs(first)
