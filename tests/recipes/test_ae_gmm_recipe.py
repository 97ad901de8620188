import torch
from seeding import offset_seed

from pyro_lvm.data import load_digits
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.evaluation import evaluate
from pyro_lvm.experiments.recipes import get_recipe
from pyro_lvm.experiments.trainer import Trainer
from pyro_lvm.models import AEGMM
from pyro_lvm.models.likelihoods import make_likelihood


def test_ae_gmm_recipe_trains_finalizes_and_evaluates():
    torch.manual_seed(offset_seed(0))
    config = TrainConfig(model="ae-gmm", latent_dim=3, hidden_dim=32, num_components=4)
    data = load_digits().for_likelihood("bernoulli")
    exp = get_recipe("ae-gmm").build(config, data.data_dim, make_likelihood("bernoulli"))
    assert isinstance(exp.lvm, AEGMM) and exp.lvm.num_components == 4
    assert exp.guide == exp.lvm.guide
    Trainer(exp, data, batch_size=500).fit(2)
    assert not bool(exp.lvm.prior_fitted)
    rng = torch.get_rng_state()
    exp.inference.finalize(data.train_x)
    assert bool(exp.lvm.prior_fitted) and exp.inference.metrics()["gmm_converged"] == 1.0
    # deterministic given the generator, which it leaves alone (exact resume after it)
    assert torch.equal(torch.get_rng_state(), rng)
    fitted = {k: v.clone() for k, v in exp.lvm.state_dict().items()}
    exp.inference.finalize(data.train_x)
    assert all(torch.equal(v, exp.lvm.state_dict()[k]) for k, v in fitted.items())
    out = evaluate(exp, data.test_x[:50], eval_samples=20)
    assert out["test_nelbo"] >= out["test_nll"] > 0  # IWAE >= ELBO with the same weights
    assert out["test_recon_nll"] > 0
