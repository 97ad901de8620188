"""Probabilistic PCA on scikit-learn's digits fitted five ways, against the exact optimum.

    python examples/ppca_digits.py --latent-dim 5 --steps 1000

Closed form (Tipping & Bishop), EM, gradient descent on the exact marginal likelihood,
SVI with PPCA's exact-capable guide, and SVI on a VAE with a linear decoder and Gaussian
likelihood. All 1797 images, full batch, float64. Returns (and prints) the exact mean
log-likelihood per image of each fitted generative model in raw-pixel units (0-16, as in
the reference table: q=5 gives -168.538) and the ELBO of the two SVI fits. Gradient fits
run on pixels / 16 (better conditioned); PPCA is closed under rescaling, so
:math:`\\log p` converts exactly by :math:`-D \\log 16`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from sklearn.datasets import load_digits

from pyro_lvm.infer import MarginalLikelihoodGD, ModuleSVI, elbo_per_datapoint
from pyro_lvm.models import (
    PPCA,
    VAE,
    GaussianLikelihood,
    PPCAParams,
    ppca_em,
    ppca_log_likelihood,
    ppca_mle,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent-dim", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000, help="gradient steps per method")
    p.add_argument("--lr", type=float, default=0.03, help="Adam; divided by 10 for the last 25%%")
    p.add_argument("--em-iters", type=int, default=1000)
    p.add_argument("--elbo-samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.json (none if omitted)")
    return p.parse_args(argv)


def _adam_with_decay(step, optim: torch.optim.Optimizer, steps: int, lr: float) -> None:
    for i in range(steps):
        for group in optim.param_groups:
            group["lr"] = lr if i < 0.75 * steps else lr / 10
        step()


def main(args: argparse.Namespace) -> dict:
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _run(args)
    finally:
        torch.set_default_dtype(old_dtype)


def _run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    raw = torch.tensor(load_digits().data)
    x = raw / 16
    q, D = args.latent_dim, raw.shape[1]
    shift = D * math.log(16)  # log p_raw(x) = log p_unit(x / 16) - D log 16

    def loglik(params: PPCAParams, data: torch.Tensor = x) -> float:
        with torch.no_grad():
            return ppca_log_likelihood(data, params).mean().item() - shift

    result = {"closed_form": ppca_log_likelihood(raw, ppca_mle(raw, q)).mean().item()}
    gen = torch.Generator().manual_seed(args.seed)
    result["em"] = loglik(ppca_em(x, q, args.em_iters, generator=gen))

    ppca = PPCA(D, q)
    generative = [*ppca.decoder.parameters(), *ppca.likelihood.parameters()]
    gd = MarginalLikelihoodGD(ppca, torch.optim.Adam(generative))
    _adam_with_decay(lambda: gd.step(x), gd.optim, args.steps, args.lr)
    result["gradient"] = loglik(ppca.params())

    models = {
        "svi": PPCA(D, q),
        "vae_linear": VAE(
            D, q, depth=0, likelihood=GaussianLikelihood(), decoder=torch.nn.Linear(q, D)
        ),
    }
    for name, lvm in models.items():
        svi = ModuleSVI(lvm.model, lvm.guide, torch.optim.Adam(lvm.parameters()))
        _adam_with_decay(lambda svi=svi: svi.step(x), svi.optim, args.steps, args.lr)
        learned = PPCAParams(lvm.decoder.weight, lvm.decoder.bias, lvm.likelihood.scale[0] ** 2)
        result[name] = loglik(learned)
        elbo = elbo_per_datapoint(lvm.model, lvm.guide, x, num_samples=args.elbo_samples)
        result[f"{name}_elbo"] = elbo.mean().item() - shift
    if args.out is not None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    res = main(parse_args())
    print(", ".join(f"{k} {v:.3f}" for k, v in res.items()))
