import pytest
import torch
from seeding import offset_seed

from pyro_lvm.data import DataBundle
from pyro_lvm.experiments.build import setup_run
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.trainer import Trainer
from pyro_lvm.infer import DivergenceError


def _data():
    g = torch.Generator().manual_seed(offset_seed(0))
    return DataBundle("toy", torch.rand(60, 6, generator=g), torch.rand(20, 6, generator=g))


def _trainer(out, **kw):
    config = TrainConfig(model="vae", latent_dim=2, hidden_dim=8, batch_size=16, seed=3, **kw)
    experiment, data = setup_run(config, _data())
    return Trainer(experiment, data, config.batch_size, out, config.seed)


def _params(trainer):
    return {k: v.clone() for k, v in trainer.experiment.modules.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted(tmp_path):
    full = _trainer(tmp_path / "full")
    full.fit(4)
    part = _trainer(tmp_path / "part")
    part.fit(2)
    resumed = _trainer(tmp_path / "part")
    resumed.restore(tmp_path / "part" / "checkpoint.pt")
    resumed.fit(4)
    assert _same(_params(full), _params(resumed))
    assert resumed.state.step == full.state.step == 16
    assert [h["train_loss"] for h in resumed.state.history] == [
        h["train_loss"] for h in full.state.history
    ]


def test_mid_epoch_stop_then_resume_is_exact(tmp_path):
    full = _trainer(tmp_path / "full")
    full.fit(2)
    part = _trainer(tmp_path / "part")

    def stop_after_five(state, loss):
        if state.step == 5:
            part.stop_requested = True

    with pytest.raises(KeyboardInterrupt):
        part.fit(2, on_step=stop_after_five)
    resumed = _trainer(tmp_path / "part")
    resumed.restore(tmp_path / "part" / "checkpoint.pt")
    assert resumed.state.step == 5 and resumed.state.batch == 1
    resumed.fit(2)
    assert _same(_params(full), _params(resumed))


def test_divergence_keeps_last_good_checkpoint(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.fit(1)
    good = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    with torch.no_grad():
        for p in trainer.experiment.modules.parameters():
            p.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="diverged"):
        trainer.fit(2)
    kept = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert _same(good["modules"], kept["modules"])
    assert kept["trainer"]["epoch"] == 1


def test_batch_larger_than_data():
    config = TrainConfig(model="vae", latent_dim=2, hidden_dim=8, batch_size=100)
    experiment, data = setup_run(config, _data())
    with pytest.raises(ValueError, match="larger than the 60 training examples"):
        Trainer(experiment, data, 100)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("latent_dim", 0, "--latent-dim"),
        ("lr", -1.0, "--lr"),
        ("lr", 0.0, "--lr"),
        ("batch_size", 0, "--batch-size"),
        ("step_size", -0.1, "--step-size"),
        ("num_steps", 0, "--num-steps"),
    ],
)
def test_impossible_hyperparameters(field, value, match):
    config = TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        config.validate()


def test_config_saved_under_former_names_loads_with_their_values(tmp_path):
    import json

    path = tmp_path / "config.json"
    old = {"model": "lae", "langevin_steps": 5, "target_accept": 0.7, "adapt": False}
    path.write_text(json.dumps(old))
    config = TrainConfig.load(path)
    assert (config.num_steps, config.target_accept_prob, config.adapt_step_size) == (5, 0.7, False)
    assert config.project_noise is False  # a run saved before project_noise existed
