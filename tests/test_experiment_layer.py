"""The experiment layer with a model that is not ours: a researcher's own Pyro model
trained through the CLI (``train custom --model-file``), loaded back with ``load_run`` and
sampled; validation, best checkpoint, early stopping, schedules, config round-trip and
per-model help."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import pyro_lvm
from pyro_lvm.cli import main
from pyro_lvm.experiments.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint

FAST = ["--latent-dim", "2", "--eval-samples", "10", "--no-progress", "--no-figures"]

# written from scratch, as a user would: no pyro_lvm model class, its own networks
USER_MODEL = textwrap.dedent(
    """
    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn


    class TinyVAE(nn.Module):
        def __init__(self, data_dim, latent_dim):
            super().__init__()
            self.latent_dim = latent_dim
            self.dec = nn.Linear(latent_dim, data_dim)
            self.enc = nn.Linear(data_dim, 2 * latent_dim)

        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample(
                    "z", dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0).to_event(1)
                )
                pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

        def guide(self, x):
            loc, log_scale = self.enc(x).chunk(2, -1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

        def generate(self, n):
            z = torch.randn(n, self.latent_dim)
            return torch.sigmoid(self.dec(z))


    def build(config, data_dim, likelihood):
        return TinyVAE(data_dim, config.latent_dim)
    """
)


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("custom")
    (folder / "tiny.py").write_text(USER_MODEL)
    spec = f"{folder / 'tiny.py'}:build"
    out = folder / "run"
    argv = ["train", "custom", "--model-file", spec, "--out", str(out), "--epochs", "3"]
    assert main([*argv, "--validation", "200", "--lr", "3e-3", *FAST]) == 0
    return out, spec


def test_custom_model_trains_through_the_cli(custom_run):
    out, _ = custom_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "custom" and metrics["epochs"] == 3
    assert metrics["num_train"] == 1500 - 200 and metrics["num_validation"] == 200
    history = json.loads((out / "history.json").read_text())["epochs"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert all("val_loss" in r for r in history)
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # it learns (3 epochs, lr 3e-3)
    assert (out / BEST_NAME).is_file()


def test_load_run_never_imports_code_unless_told(custom_run):
    out, spec = custom_run
    with pytest.raises(ValueError, match="pass model_file="):
        pyro_lvm.load_run(out)
    run = pyro_lvm.load_run(out, model_file=spec)
    assert run.config.model == "custom" and run.data_dim == 64
    assert run.history["epochs"][-1]["epoch"] == 3
    x = run.model.generate(5)
    assert x.shape == (5, 64) and torch.isfinite(x).all()
    with pytest.warns(UserWarning, match="the sample figure skipped: the model has no decoder"):
        assert main(["sample", str(out), "--num", "4", "--model-file", spec]) == 0
    assert (out / "sample_n4_seed0.pt").is_file()


def test_load_run_of_a_ready_model_without_the_dataset(tmp_path, monkeypatch):
    out = tmp_path / "vae"
    assert (
        main(["train", "vae", "--out", str(out), "--epochs", "1", "--hidden-dim", "16", *FAST])
        == 0
    )
    import pyro_lvm.data
    import pyro_lvm.data.datasets
    import pyro_lvm.experiments.lifecycle

    def no_data(*args, **kwargs):
        raise AssertionError("load_run touched the dataset")

    for module in (pyro_lvm.data, pyro_lvm.data.datasets, pyro_lvm.experiments.lifecycle):
        monkeypatch.setattr(module, "load_dataset", no_data)
    monkeypatch.setattr(pyro_lvm.data.datasets, "load_digits", no_data)
    run = pyro_lvm.load_run(out)
    assert run.metrics["epochs"] == 1 and run.config.latent_dim == 2
    assert next(run.model.parameters()).device.type == "cpu"
    assert run.model.generate(3).shape == (3, 64)


def test_best_checkpoint_and_resume_from_it(tmp_path):
    out = tmp_path / "vae"
    argv = ["train", "vae", "--out", str(out), "--hidden-dim", "16", "--epochs", "3"]
    assert main([*argv, "--validation", "100", *FAST]) == 0
    best = load_checkpoint(out / BEST_NAME)
    history = json.loads((out / "history.json").read_text())["epochs"]
    best_epoch = min(history, key=lambda r: r["val_loss"])["epoch"]
    assert best["trainer"]["epoch"] == best_epoch
    run = pyro_lvm.load_run(out, checkpoint=BEST_NAME)
    assert run.trainer.state.epoch == best_epoch


def test_early_stopping_stops_and_says_so(tmp_path):
    out = tmp_path / "vae"
    # lr ~ 0: the held-out losses are iid Monte Carlo draws, so patience 1 runs all 10
    # epochs only if they strictly decrease: probability 1/10! = 3e-7
    argv = ["train", "vae", "--out", str(out), "--hidden-dim", "16", "--epochs", "10"]
    argv += ["--optimizer", "sgd", "--lr", "1e-12", "--validation", "100"]
    assert main([*argv, "--early-stopping", "1", *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] is True and metrics["epochs"] < 10


@pytest.mark.parametrize("schedule, expected", [("cosine", 0.0), ("step", 1e-3 * 0.5**2)])
def test_lr_schedules(tmp_path, schedule, expected):
    out = tmp_path / "vae"
    argv = ["train", "vae", "--out", str(out), "--hidden-dim", "16", "--epochs", "2"]
    argv += ["--lr-schedule", schedule, "--lr-step", "1", "--lr-gamma", "0.5"]
    assert main([*argv, *FAST]) == 0
    run = pyro_lvm.load_run(out)
    lrs = [g["lr"] for g in run.experiment.inference.optim.param_groups]
    assert lrs and all(abs(lr - expected) < 1e-12 for lr in lrs), lrs


def test_config_round_trip_reproduces_the_run(tmp_path):
    first = tmp_path / "a"
    argv = ["--hidden-dim", "16", "--epochs", "1", "--seed", "3", "--lr", "2e-3"]
    assert main(["train", "vae", "--out", str(first), *argv, *FAST]) == 0
    second = tmp_path / "b"
    config = str(first / "config.json")
    assert main(["train", "vae", "--config", config, "--out", str(second), *FAST[-2:]]) == 0
    a = json.loads((first / "config.json").read_text())
    b = json.loads((second / "config.json").read_text())
    assert {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}
    sa = load_checkpoint(first / CHECKPOINT_NAME)["modules"]
    sb = load_checkpoint(second / CHECKPOINT_NAME)["modules"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same code path, same seed


def test_per_model_help_shows_only_its_flags_with_defaults(capsys):
    assert main(["train", "vae", "--help"]) == 0
    vae = capsys.readouterr().out
    assert main(["train", "lae", "--help"]) == 0
    lae = capsys.readouterr().out
    assert vae != lae
    assert "--estimator" not in vae and "--num-steps" not in vae
    assert "--num-steps" in lae and "(default: 2)" in lae
    assert "--lr LR" in vae and "(default: 0.001)" in vae
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("pyro-lvm ")


def test_tensorboard_gets_validation_images_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "vae"
    argv = ["train", "vae", "--out", str(out), "--hidden-dim", "16", "--epochs", "2"]
    assert main([*argv, "--validation", "100", "--eval-samples", "10", "--no-progress"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert "validation/loss" in tags["scalars"] and "test/test_nll" in tags["scalars"]
    assert {"figures/training", "figures/samples"} <= set(tags["images"])
    assert (out / "tensorboard" / "hparams").is_dir()
