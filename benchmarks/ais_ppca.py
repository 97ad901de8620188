"""How accurate are pyro_lvm's likelihood estimators? PPCA on digits, where log p(x) is exact.

Fits PPCA in closed form on scikit-learn's digits (raw pixels 0-16, first 1500 images)
and, on the next ``--num-test`` images, compares with the exact :math:`\\log p(x)`:

- ``ais``: :func:`pyro_lvm.infer.ais_log_likelihood` for several ``num_steps``;
- ``iwae-langevin``: IWAE (K samples) with a Gaussian proposal fitted to short per-datapoint
  MALA chains started at the posterior mean (:class:`pyro_lvm.infer.LangevinProposalGuide`);
- ``iwae-fixed``: IWAE with the paper's fixed proposal :math:`\\mathcal N(\\text{mean},
  s^2 I)` (s = ``--test-scale``), and its single-sample ELBO (the LAE paper's protocol).

Reports per method the mean error (estimate - exact, nats per image; negative = below),
the largest absolute error, the spread of AIS log weights and the wall time.

    python benchmarks/ais_ppca.py [--latent-dims 5 10] [--steps 10 100 1000 3000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from sklearn.datasets import load_digits

from pyro_lvm.infer import (
    LangevinProposalGuide,
    annealed_importance_sampling,
    elbo_per_datapoint,
    iwae_log_likelihood,
)
from pyro_lvm.models.ppca import PPCA


def fixed_scale_guide(ppca: PPCA, scale: float):
    def guide(x):
        loc = ppca.encode(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


def _row(method, latent_dim, setting, estimate, exact, seconds, **extra):
    err = estimate - exact
    return {
        "latent_dim": latent_dim,
        "method": method,
        "setting": setting,
        "mean_error": err.mean().item(),
        "max_abs_error": err.abs().max().item(),
        "seconds": seconds,
        **extra,
    }


def run_one(latent_dim: int, x_train, x_test, args) -> list[dict]:
    ppca = PPCA(x_train.shape[1], latent_dim).double().fit_closed_form(x_train)
    exact = ppca.exact_log_likelihood(x_test).detach()
    rows = []
    for steps in args.steps:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        r = annealed_importance_sampling(
            ppca.model, x_test, num_steps=steps, num_chains=args.num_chains
        )
        rows.append(
            _row(
                "ais",
                latent_dim,
                f"num_steps={steps}, chains={args.num_chains}",
                r.log_likelihood,
                exact,
                time.perf_counter() - t0,
                log_weight_sd=r.log_weights.std(0).mean().item(),
                accept_rate=r.accept_rate.mean().item(),
            )
        )
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    guide = LangevinProposalGuide(ppca.model, ppca.encode, args.refine_steps)
    ll = iwae_log_likelihood(ppca.model, guide, x_test, num_samples=args.eval_samples)
    rows.append(
        _row(
            "iwae-langevin",
            latent_dim,
            f"K={args.eval_samples}, {args.refine_steps} MALA steps x 8 chains",
            ll,
            exact,
            time.perf_counter() - t0,
        )
    )
    guide = fixed_scale_guide(ppca, args.test_scale)
    t0 = time.perf_counter()
    ll = iwae_log_likelihood(ppca.model, guide, x_test, num_samples=args.eval_samples)
    rows.append(
        _row(
            "iwae-fixed",
            latent_dim,
            f"K={args.eval_samples}, q=N(mean, {args.test_scale}^2)",
            ll,
            exact,
            time.perf_counter() - t0,
        )
    )
    t0 = time.perf_counter()
    elbo = elbo_per_datapoint(ppca.model, guide, x_test, num_samples=1)
    rows.append(
        _row(
            "elbo-fixed",
            latent_dim,
            f"1 sample, q=N(mean, {args.test_scale}^2)",
            elbo,
            exact,
            time.perf_counter() - t0,
        )
    )
    for row in rows:
        row["exact_mean"] = exact.mean().item()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent-dims", type=int, nargs="+", default=[5, 10])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000, 3000])
    p.add_argument("--num-chains", type=int, default=16)
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--refine-steps", type=int, default=100)
    p.add_argument("--test-scale", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ais_ppca.json"))
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.tensor(load_digits().data, dtype=torch.float64)
    x_train, x_test = x[:1500], x[1500 : 1500 + args.num_test]
    rows = []
    for q in args.latent_dims:
        rows.extend(run_one(q, x_train, x_test, args))
    header = f"{'q':>3} {'method':<14} {'setting':<42} {'mean err':>9} {'max |err|':>9} {'sec':>7}"
    print(header)
    for r in rows:
        print(
            f"{r['latent_dim']:>3} {r['method']:<14} {r['setting']:<42} "
            f"{r['mean_error']:>9.3f} {r['max_abs_error']:>9.3f} {r['seconds']:>7.1f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
