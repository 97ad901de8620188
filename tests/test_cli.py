import json
import subprocess
import sys

import pytest
import torch

from pyro_lvm.cli import main

FAST = [
    "--epochs",
    "1",
    "--hidden-dim",
    "16",
    "--latent-dim",
    "2",
    "--eval-samples",
    "10",
    "--no-progress",
]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "vae"
    assert main(["train", "vae", "--out", str(out), *FAST]) == 0
    return out


CONTRACT_KEYS = {
    "model",
    "dataset",
    "num_train",
    "num_test",
    "data_dim",
    "latent_dim",
    "epochs",
    "steps",
    "train_seconds",
    "ms_per_step",
    "test_nelbo",
    "test_nelbo_per_dim",
    "test_nll",
    "test_nll_per_dim",
    "eval_samples",
}


def test_train_writes_contract(vae_run):
    metrics = json.loads((vae_run / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(metrics)
    assert metrics["dataset"] == "digits" and metrics["data_dim"] == 64
    assert metrics["steps"] == 15 and metrics["epochs"] == 1
    # the importance-weighted bound is tighter than the ELBO from the same samples
    assert metrics["test_nll"] <= metrics["test_nelbo"] + 1e-6
    assert abs(metrics["test_nll_per_dim"] * 64 - metrics["test_nll"]) < 1e-6
    for name in ("samples", "reconstructions", "latent", "interpolation", "training"):
        assert (vae_run / f"{name}.png").stat().st_size > 1000
    assert (vae_run / "checkpoint.pt").exists() and (vae_run / "config.json").exists()


def test_evaluate_and_sample(vae_run):
    assert main(["evaluate", str(vae_run), "--eval-samples", "20"]) == 0
    metrics = json.loads((vae_run / "metrics.json").read_text())
    assert metrics["eval_samples"] == 20
    figure = (vae_run / "samples.png").read_bytes()
    assert main(["sample", str(vae_run), "--num", "9"]) == 0
    x = torch.load(vae_run / "sample_n9_seed0.pt", weights_only=True)
    assert x.shape == (9, 64)
    assert (vae_run / "sample_n9_seed0.png").exists()
    # the training figure is not overwritten
    assert (vae_run / "samples.png").read_bytes() == figure


def test_resume_continues(vae_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(vae_run, run)
    assert (
        main(
            [
                "train",
                "vae",
                "--resume",
                str(run),
                "--epochs",
                "2",
                "--no-progress",
                "--no-figures",
            ]
        )
        == 0
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["steps"] == 30


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "vae", "--latent-dim", "0"], "--latent-dim must be positive"),
        (["train", "vae", "--lr", "-1"], "--lr must be positive"),
        (["train", "vae", "--batch-size", "5000"], "larger than the 1500 training examples"),
        (["train", "vae", "--dataset", "mnist", "--data-dir", "/nonexistent"], "--download"),
        (["train", "vae", "--resume", "/nonexistent"], "not a pyro-lvm run"),
        (["train", "vae", "--device", "cuda"], "CUDA is not available"),
        (["evaluate", "/nonexistent"], "not a pyro-lvm run"),
        (
            ["train", "vae", "--likelihood", "bernoulli", "--dataset", "digits", "--epochs", "-1"],
            "--epochs",
        ),
    ],
)
def test_bad_input_is_one_line(argv, match, capsys, tmp_path, monkeypatch):
    if argv[1] == "vae" and torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("CUDA is available on this machine")
    monkeypatch.chdir(tmp_path)  # the default --out (runs/...) must not meet a user's run
    code = main([*argv, "--no-progress"] if argv[0] == "train" else argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert match in err and len(err.splitlines()) == 1, err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "pyro_lvm", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "usage: pyro-lvm" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pyro_lvm", "train", "nosuchmodel"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "nosuchmodel" in bad.stderr
