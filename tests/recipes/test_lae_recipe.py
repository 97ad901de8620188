import math

import pytest
import torch
from seeding import offset_seed

from pyro_lvm.data import load_digits
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.evaluation import evaluate
from pyro_lvm.experiments.recipes import get_recipe
from pyro_lvm.experiments.trainer import Trainer
from pyro_lvm.infer import LAE
from pyro_lvm.models import LangevinAutoencoder
from pyro_lvm.models.likelihoods import make_likelihood


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: one thread is ~10x faster than two on a shared, busy CPU
    # (the conftest fixture restores the thread count after each test)
    torch.set_num_threads(1)


def test_lae_recipe_trains_on_digits_with_acceptance_near_target():
    torch.manual_seed(offset_seed(0))
    config = TrainConfig(model="lae", latent_dim=4, hidden_dim=128, depth=2, batch_size=100)
    data = load_digits().for_likelihood("bernoulli")
    exp = get_recipe("lae").build(config, data.data_dim, make_likelihood("bernoulli"))
    assert isinstance(exp.lvm, LangevinAutoencoder) and isinstance(exp.inference, LAE)
    # test_nll's proposal is fitted to MALA chains; the paper's fixed one is *_fixed
    assert exp.guide != exp.lvm.guide and exp.fixed_guide == exp.lvm.guide
    test_x = data.test_x[:100]
    before = evaluate(exp, test_x, eval_samples=20)
    Trainer(exp, data, batch_size=config.batch_size).fit(4)
    after = evaluate(exp, test_x, eval_samples=20)
    # training improves the importance-weighted likelihood of held-out digits a lot
    assert after["test_nll"] < before["test_nll"] - 5.0
    assert after["test_nelbo"] >= after["test_nll"]
    assert after["eval_proposal"].startswith("langevin-refined (20 MALA steps")
    # the refined proposal judges the decoder better than the paper's fixed one
    assert after["test_nll"] < after["test_nll_fixed"]
    metrics = exp.inference.metrics()
    assert 0.3 < metrics["accept_rate"] < 0.9
    assert math.isfinite(metrics["step_size"]) and metrics["step_size"] > 0
    # the chain weight is the encoder's last layer: checkpointed with the modules
    assert f"encoder.{len(exp.lvm.encoder) - 1}.weight" in exp.modules.state_dict()  # chain


def test_jacobian_and_project_noise_flags_reach_the_trainer():
    for flag in (False, True):
        config = TrainConfig(
            model="lae", latent_dim=2, hidden_dim=128, project_noise=flag, jacobian=flag
        )
        exp = get_recipe("lae").build(config, 64, make_likelihood("bernoulli"))
        assert exp.inference.kernel.project_noise is flag and exp.inference.jacobian is flag


def test_a_run_saved_before_project_noise_existed_loads_without_it(tmp_path):
    import json

    path = tmp_path / "config.json"
    TrainConfig(model="lae").save(path)
    assert TrainConfig.load(path).project_noise and TrainConfig.load(path).jacobian
    saved = json.loads(path.read_text())
    del saved["project_noise"]  # as an earlier version wrote it
    path.write_text(json.dumps(saved))
    assert TrainConfig.load(path).project_noise is False
