"""Bernoulli-latent VAE of seed 001 on binarized digits: 20 binary latents, 400 hidden
units, score-function gradients with a running-average baseline.

The encoder's gradient cannot use the reparameterization trick, so it is the score
function :math:`\\nabla_\\phi \\log q_\\phi(z \\mid x)\\,(\\ell - b)` with the learning signal
:math:`\\ell = \\log p(x, z) - \\log q(z \\mid x)` and a running-average baseline :math:`b`
(:class:`pyro_lvm.infer.TraceNVIL_ELBO`). ``--baseline`` picks the global running
average (the seed's choice), the per-datapoint one (keyed by row indices), NVIL's full
recipe, or none; ``--estimator vimco`` trains the K-sample bound instead.

    python examples/bernoulli_vae.py --epochs 50 --out runs/bernoulli-vae

Returns (and prints) the test negative ELBO and the K-sample negative log-likelihood
estimate in nats per image; with ``--out``, saves generated images (``samples.png``) and
the other standard figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pyro_lvm.data import load_digits
from pyro_lvm.experiments.evaluation import evaluate
from pyro_lvm.experiments.recipes import Experiment
from pyro_lvm.experiments.recipes.sbn import nvil_baselines
from pyro_lvm.experiments.trainer import Trainer
from pyro_lvm.infer import VIMCO, ModuleSVI, RunningAverageBaseline, TraceNVIL_ELBO
from pyro_lvm.models import BernoulliLikelihood, BernoulliVAE

BASELINES = ("running", "per-datapoint", "nvil", "none")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--hidden-dim", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--estimator", choices=("score", "vimco"), default="score")
    p.add_argument("--baseline", choices=BASELINES, default="running")
    p.add_argument("--num-particles", type=int, default=1)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for figures (none if omitted)")
    return p.parse_args(argv)


def make_loss(args: argparse.Namespace, vae: BernoulliVAE):
    if args.estimator == "vimco":
        return VIMCO(
            num_particles=args.num_particles, max_plate_nesting=1, vectorize_particles=True
        )
    baselines = {
        "running": {"z": RunningAverageBaseline(beta=0.9, per_datapoint=False)},
        "per-datapoint": {"z": RunningAverageBaseline(beta=0.9)},
        "nvil": nvil_baselines(vae.latent_sites, vae.data_dim),
        "none": {},
    }[args.baseline]
    return TraceNVIL_ELBO(
        num_particles=args.num_particles,
        vectorize_particles=args.num_particles > 1,
        max_plate_nesting=1,
        baselines=baselines,
        cache_dependencies=True,
    )


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    data = load_digits().for_likelihood("bernoulli")
    vae = BernoulliVAE(
        data.data_dim, args.latent_dim, args.hidden_dim, likelihood=BernoulliLikelihood()
    )
    loss = make_loss(args, vae)
    modules = torch.nn.ModuleDict({"lvm": vae})
    params = list(vae.parameters())
    if isinstance(loss, TraceNVIL_ELBO):
        modules["baselines"] = loss.baselines
        params += list(loss.parameters())
    svi = ModuleSVI(vae.model, vae.guide, torch.optim.Adam(params, lr=args.lr), loss=loss)
    experiment = Experiment(
        lvm=vae, inference=svi, modules=modules, continuous_latents=False, pass_index=True
    )
    trainer = Trainer(experiment, data, args.batch_size, seed=args.seed)
    state = trainer.fit(args.epochs)
    metrics = evaluate(experiment, data.test_x, eval_samples=args.eval_samples)
    result = {
        "train_loss": state.history[-1]["train_loss"],
        "test_nelbo": metrics["test_nelbo"],
        "test_nll": metrics["test_nll"],
        "ms_per_step": trainer.ms_per_step,
    }
    if args.out is not None:
        from pyro_lvm.experiments.figures import write_figures

        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_figures(experiment, data, state, Path(args.out))
    return result


if __name__ == "__main__":
    res = main(parse_args())
    print(", ".join(f"{k} {v:.3f}" for k, v in res.items()))
