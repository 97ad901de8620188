"""A run keeps its whole state and a library call keeps the caller's: Pyro params outside
the modules survive checkpoints (evaluate, load_run, resume); ``load_run`` and
``build_experiment`` leave Pyro's validation and the global generators alone; ``--epochs
0`` writes a loadable run; ``--overwrite`` removes the previous run's samples."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from seeding import offset_seed
from user_models import PARAM_MODEL

import pyro_lvm
from pyro_lvm.cli import main
from pyro_lvm.experiments.build import build_experiment
from pyro_lvm.experiments.checkpoint import CHECKPOINT_NAME, load_checkpoint
from pyro_lvm.experiments.config import TrainConfig

QUIET = ["--no-progress", "--no-figures"]
FAST = ["--latent-dim", "2", "--eval-samples", "10", *QUIET]

NAMES = ("prior_loc", "prior_scale")


def _store() -> dict[str, torch.Tensor]:
    """The constrained values of the model's params, as a fresh process would see them."""
    return {name: pyro.param(name).detach().clone() for name in NAMES}


@pytest.fixture
def param_model(tmp_path) -> str:
    path = tmp_path / "prior_params.py"
    path.write_text(PARAM_MODEL)
    return f"{path}:build"


def _train(spec: str, out: Path, *flags: str) -> None:
    argv = ["train", "custom", "--model-file", spec, "--out", str(out), "--lr", "0.05"]
    assert main([*argv, "--seed", str(offset_seed(5)), *FAST, *flags]) == 0


def test_pyro_params_come_back_from_the_checkpoint_exactly(param_model, tmp_path):
    out = tmp_path / "a"
    pyro.clear_param_store()  # each step below as in a fresh process
    _train(param_model, out, "--epochs", "2")
    trained = _store()
    assert not torch.equal(trained["prior_loc"], torch.zeros(2))  # it was trained
    assert not torch.equal(trained["prior_scale"], torch.ones(2))
    metrics = json.loads((out / "metrics.json").read_text())

    pyro.clear_param_store()
    run = pyro_lvm.load_run(out, model_file=param_model)
    assert run.config.model == "custom"
    for name, value in _store().items():
        assert torch.equal(value, trained[name]), name
    saved = load_checkpoint(out / CHECKPOINT_NAME)["params"]
    assert set(saved) == set(NAMES) and saved["prior_scale"]["constraint"] == {"name": "positive"}

    pyro.clear_param_store()
    assert main(["evaluate", str(out), "--eval-samples", "10", "--model-file", param_model]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["test_nll"] == metrics["test_nll"]
    assert again["test_nelbo"] == metrics["test_nelbo"]


def test_resume_restores_pyro_params_exactly(param_model, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    pyro.clear_param_store()
    _train(param_model, whole, "--epochs", "2")
    pyro.clear_param_store()
    _train(param_model, halves, "--epochs", "1")
    pyro.clear_param_store()
    argv = ["train", "custom", "--resume", str(halves), "--model-file", param_model]
    assert main([*argv, "--epochs", "2", *QUIET]) == 0
    a = load_checkpoint(whole / CHECKPOINT_NAME)
    b = load_checkpoint(halves / CHECKPOINT_NAME)
    for name in NAMES:
        assert torch.equal(a["params"][name]["value"], b["params"][name]["value"]), name
    for key, value in a["modules"].items():
        assert torch.equal(value, b["modules"][key]), key


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("state") / "vae"
    assert (
        main(["train", "vae", "--out", str(out), "--epochs", "1", "--hidden-dim", "16", *FAST])
        == 0
    )
    return out


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("validation", [True, False])
def test_load_run_and_build_leave_the_process_alone(vae_run, validation):
    config = TrainConfig.load(vae_run / "config.json")
    after_build = []
    for seed in (offset_seed(1), offset_seed(2)):
        _seed(seed)
        expected = _draws()
        with pyro.validation_enabled(validation):
            _seed(seed)
            pyro_lvm.load_run(vae_run)  # not a draw taken: the caller's streams as they were
            assert pyro.distributions.is_validation_enabled() is validation
            assert pyro.infer.util.is_validation_enabled() is validation
            assert _draws() == expected
            _seed(seed)
            build_experiment(config, 64)  # initial weights are torch draws, as nn.Linear's
            assert pyro.distributions.is_validation_enabled() is validation
            assert pyro.infer.util.is_validation_enabled() is validation
            after_build.append(_draws())
    assert after_build[0] != after_build[1]  # the caller's seed, not the run's


def test_evaluate_and_sample_leave_the_generators_alone(vae_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(vae_run, run)
    _seed(offset_seed(3))
    expected = _draws()
    _seed(offset_seed(3))
    assert main(["evaluate", str(run), "--eval-samples", "5"]) == 0
    assert main(["sample", str(run), "--num", "3", "--seed", "7"]) == 0
    assert _draws() == expected


def test_zero_epochs_writes_a_run_that_loads(tmp_path):
    out = tmp_path / "vae"
    argv = ["train", "vae", "--out", str(out), "--epochs", "0", "--hidden-dim", "16", *FAST]
    assert main(argv) == 0
    assert (out / CHECKPOINT_NAME).is_file()
    assert main(["evaluate", str(out), "--eval-samples", "5"]) == 0
    assert pyro_lvm.load_run(out).trainer.state.epoch == 0


def test_overwrite_removes_the_previous_runs_samples(vae_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(vae_run, run)
    assert main(["sample", str(run), "--num", "3"]) == 0
    assert list(run.glob("sample_n3_seed0.*"))
    argv = ["train", "vae", "--out", str(run), "--overwrite", "--epochs", "1"]
    assert main([*argv, "--hidden-dim", "16", *FAST]) == 0
    assert not list(run.glob("sample_n*")), sorted(p.name for p in run.iterdir())
