"""``pyro-lvm train pgd`` recipe: builds on the VAE's decoder, trains with per-row
particles, checkpoints them, evaluates with a proposal from the prior."""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch

from pyro_lvm import load_run
from pyro_lvm.cli import main
from pyro_lvm.experiments.build import build_experiment
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.evaluation import evaluate
from pyro_lvm.experiments.recipes import get_recipe
from pyro_lvm.infer import PGD, LangevinProposalGuide
from pyro_lvm.models import GeneratorNetwork, make_likelihood


def _build(model="pgd", **overrides):
    config = TrainConfig(model=model, latent_dim=2, hidden_dim=16, depth=1, **overrides)
    return get_recipe(model).build(config, 12, make_likelihood("bernoulli"))


def test_pgd_recipe_trains_with_indices_and_evaluates():
    torch.set_num_threads(1)
    exp = _build(num_particles=3, refine_steps=6)
    assert isinstance(exp.inference, PGD) and isinstance(exp.lvm, GeneratorNetwork)
    assert exp.pass_index and isinstance(exp.guide, LangevinProposalGuide)
    assert exp.inference.num_particles == 3 and exp.inference.step_size == 0.01
    x = torch.randint(0, 2, (40, 12)).float()
    losses = [exp.inference.step(x[rows], rows) for rows in torch.arange(40).split(20)]
    assert all(math.isfinite(v) for v in losses)
    assert exp.inference.particles.shape == (40, 3, 2) and exp.inference.initialized.all()
    assert math.isfinite(exp.inference.evaluate_loss(x[:5]))  # held-out rows: no particles
    out = evaluate(exp, x[:10], eval_samples=8, eval_ais=3)
    assert out["eval_proposal"].startswith("langevin-refined (6 MALA steps from the best of 8")
    for key in ("test_nelbo", "test_nll", "test_nll_ais"):
        assert math.isfinite(out[key])
    assert exp.lvm.encode(x[:10]).shape == (10, 2)


def test_pgd_has_the_vae_decoder_and_refuses_no_refinement():
    """Same seed, same decoder initialisation as the VAE (compare's identical networks)."""
    built = {}
    for model in ("vae", "pgd"):
        pyro.set_rng_seed(0)  # as setup_run seeds before building
        built[model] = build_experiment(TrainConfig(model=model, hidden_dim=16, depth=1), 12)
    vae, pgd = built["vae"], built["pgd"]
    decoder = pgd.lvm.decoder.state_dict()
    assert all(torch.equal(v, decoder[k]) for k, v in vae.lvm.decoder.state_dict().items())
    with pytest.raises(ValueError, match="--refine-steps >= 2"):
        _build(refine_steps=0)


def test_pgd_cli_run_checkpoints_its_particles(tmp_path):
    out = tmp_path / "pgd"
    argv = ["--hidden-dim", "16", "--latent-dim", "2", "--eval-samples", "10"]
    assert main(["train", "pgd", "--out", str(out), "--epochs", "1", *argv, "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["test_nll"]) and metrics["eval_proposal"].startswith("langevin")
    run = load_run(out)
    table = run.experiment.inference.particles
    assert (
        table.shape[0] >= metrics["num_train"]
        and run.experiment.inference.initialized.sum() == metrics["num_train"]
    )
    assert main(["train", "pgd", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
