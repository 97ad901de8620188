"""Amortized Langevin dynamics on a conjugate Gaussian: samples vs the closed form.

The toy validation of the LAE paper (Taniguchi et al. 2022, Sec. 5.1): three datapoints
x_i in R^2, prior z_i ~ N(0, I), likelihood x_i | z_i ~ N(z_i, sigma^2 I), so each
posterior is N(x_i / (1 + sigma^2), sigma^2 / (1 + sigma^2) I). ONE Langevin chain runs
on the weight Phi of an encoder's last layer, z_i = Phi g(x_i) + b, with a fixed random
trunk g of width 8 >= 3 (the rank condition); the encoder outputs along the chain are
compared with each closed-form posterior (mean, variances, correlation), with Monte Carlo
standard errors from the effective sample size.

    python examples/ald_conjugate_gaussian.py --num-samples 10000 --out runs/ald-gaussian

Returns the largest |error| / standard error over all moments, the acceptance rate and
the adapted step size; with ``--out`` saves ``ald_conjugate_gaussian.png`` (samples over
the exact posterior's 1-, 2- and 3-sigma contours).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC
from pyro.ops.stats import effective_sample_size
from torch import nn

from pyro_lvm.infer import AmortizedLangevin


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--warmup-steps", type=int, default=1000)
    p.add_argument("--sigma", type=float, default=0.5, help="likelihood standard deviation")
    p.add_argument("--width", type=int, default=8, help="encoder feature width (>= 3)")
    p.add_argument("--no-mh", action="store_true", help="unadjusted Langevin (biased)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the figure (none if omitted)")
    return p.parse_args(argv)


def make_model(sigma: float):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, sigma).to_event(1), obs=x)

    return model


def exact_posterior(x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means (N, 2) and the shared covariance (2, 2)."""
    shrink = 1.0 / (1.0 + sigma**2)
    return x * shrink, sigma**2 * shrink * torch.eye(x.shape[1])


def _standard_errors(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor):
    """Rows (datapoint, moment, exact, estimate, z-score) for every mean/cov entry."""
    rows = []
    for i in range(samples.shape[1]):
        z = samples[:, i]
        for a in range(2):
            ess = float(effective_sample_size(z[None, :, a], 0, 1))
            se = math.sqrt(cov[a, a] / ess)
            est = float(z[:, a].mean())
            rows.append((i, f"mean[{a}]", float(mean[i, a]), est, (est - mean[i, a]) / se))
        for a, b in ((0, 0), (1, 1), (0, 1)):
            prod = (z[:, a] - mean[i, a]) * (z[:, b] - mean[i, b])
            ess = float(effective_sample_size(prod[None], 0, 1))
            sd = math.sqrt(cov[a, a] * cov[b, b] + cov[a, b] ** 2)
            est = float(prod.mean())
            rows.append(
                (i, f"cov[{a}{b}]", float(cov[a, b]), est, (est - cov[a, b]) / (sd / ess**0.5))
            )
    return rows


def _figure(samples, mean, cov, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    angles = torch.linspace(0, 2 * math.pi, 200)
    circle = torch.stack([angles.cos(), angles.sin()], -1)
    chol = torch.linalg.cholesky(cov)
    colors = ["tab:blue", "tab:orange", "tab:green"]
    thin = max(1, samples.shape[0] // 2000)
    for i in range(samples.shape[1]):
        color = colors[i % len(colors)]
        z = samples[::thin, i]
        ax.scatter(z[:, 0], z[:, 1], s=2, alpha=0.3, color=color, label=f"ALD, x_{i + 1}")
        for k in (1, 2, 3):
            ring = mean[i] + k * circle @ chol.T
            ax.plot(ring[:, 0], ring[:, 1], color=color, lw=1.0)
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    ax.set_title("ALD samples vs exact posteriors (1, 2, 3 sd contours)")
    ax.legend(loc="best", markerscale=4, fontsize=8)
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> dict:
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    x = torch.tensor([[-3.0, 1.5], [2.0, 2.5], [1.0, -2.5]])
    model = make_model(args.sigma)
    encoder = nn.Sequential(nn.Linear(2, args.width), nn.Tanh(), nn.Linear(args.width, 2))
    for p in encoder[0].parameters():  # fixed trunk: the rank condition holds
        p.requires_grad_(False)
    kernel = AmortizedLangevin(model, encoder, mh=not args.no_mh)
    mcmc = MCMC(
        kernel, num_samples=args.num_samples, warmup_steps=args.warmup_steps, disable_progbar=True
    )
    mcmc.run(x)
    samples = mcmc.get_samples()["z"]
    mean, cov = exact_posterior(x, args.sigma)
    rows = _standard_errors(samples, mean, cov)

    print(f"{'x':>3} {'moment':>8} {'exact':>8} {'ALD':>8} {'z-score':>8}")
    for i, name, exact, est, zscore in rows:
        print(f"{i + 1:>3} {name:>8} {exact:8.4f} {est:8.4f} {zscore:8.2f}")
    diag = kernel.diagnostics()
    print(f"acceptance {diag['accept_rate']:.3f}, step size {diag['step_size']:.3g}")
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _figure(samples, mean, cov, out / "ald_conjugate_gaussian.png")
    return {
        "max_abs_zscore": max(abs(r[4]) for r in rows),
        "max_abs_error": max(abs(r[3] - r[2]) for r in rows),
        "accept_rate": float(diag["accept_rate"]),
        "step_size": float(diag["step_size"]),
        "num_samples": args.num_samples,
    }


if __name__ == "__main__":
    main(parse_args())
