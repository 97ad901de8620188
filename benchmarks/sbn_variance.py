"""Gradient estimators for Bernoulli latents: encoder-gradient variance and -ELBO.

Sigmoid belief nets (200 binary latents, linear and/or nonlinear benchmark architecture)
on binarized digits (scikit-learn, fixed-seed binarization for the test set; dynamic
binarization in training) and MNIST when ``--data-dir`` holds it. Estimators (the CLI's
``--estimator``):

- ``reinforce``: score function of each datapoint's whole ELBO, no baseline;
- ``tracegraph``: Pyro's TraceGraph_ELBO with its decaying-average baseline;
- ``nvil``: :class:`pyro_lvm.infer.TraceNVIL_ELBO` with a global running average, a
  neural baseline and signal normalisation (the CLI's default);
- ``nvil_pd``: the same with the per-datapoint running average;
- ``vimco``: :class:`pyro_lvm.infer.VIMCO` with ``--vimco-particles`` samples;
- ``disarm``: :class:`pyro_lvm.infer.DisARM`, one antithetic pair (two model passes).

Three measurements per estimator:

1. **Encoder-gradient variance** at fixed parameters: every estimator starts from the
   same parameters (``--pretrain`` steps of ``nvil`` training from a fixed seed), warms
   its baselines for ``--warm-epochs`` passes over the training set with the model frozen,
   then draws ``--repeats`` gradient estimates on one fixed minibatch; the variance of
   each encoder parameter's gradient over the repeats, summed over encoder parameters.
   For ``nvil`` the normalisation is switched off (``SignalNormalization`` rescales the
   gradient, so its variance is not comparable); for ``tracegraph`` the decaying average
   is restored after each repeat so every estimate uses the same baseline.
2. **-ELBO after a fixed number of steps** (``--steps``) from the same initialisation:
   test -ELBO (``elbo_per_datapoint``, 10 samples) and the 100-sample bound (test NLL
   estimate, ``iwae_log_likelihood``), nats per image; and ms per step.
3. **-ELBO after a fixed wall time** (``--seconds``).

Prints a table and writes ``benchmarks/results/sbn_variance.json``.

    python benchmarks/sbn_variance.py [--archs linear nonlinear] [--steps 1500]
        [--seconds 15] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from pyro_lvm.data import binarize, load_dataset
from pyro_lvm.experiments.recipes.sbn import make_estimator, nvil_baselines
from pyro_lvm.infer import (
    ModuleSVI,
    SignalNormalization,
    TraceNVIL_ELBO,
    elbo_per_datapoint,
    iwae_log_likelihood,
)
from pyro_lvm.models import SigmoidBeliefNet

ESTIMATORS = ["reinforce", "tracegraph", "nvil", "nvil_pd", "vimco", "disarm"]


def make_model(arch: str, data_dim: int, latent_dim: int, seed: int) -> SigmoidBeliefNet:
    torch.manual_seed(seed)
    return SigmoidBeliefNet(data_dim, latent_dim, nonlinear=arch == "nonlinear", hidden_dim=200)


def make_loss(name: str, sbn: SigmoidBeliefNet, vimco_particles: int, normalize: bool = True):
    particles = vimco_particles if name == "vimco" else 1
    if name == "nvil_pd":  # the per-datapoint running average instead of the global one
        loss = TraceNVIL_ELBO(
            baselines=nvil_baselines(sbn.latent_sites, sbn.data_dim, per_datapoint=True),
            cache_dependencies=True,
            max_plate_nesting=1,
        )
    else:
        loss = make_estimator(name, particles, sbn.latent_sites, sbn.data_dim)
    if isinstance(loss, TraceNVIL_ELBO) and not normalize:
        for stack in loss.baselines.values():
            for k in reversed(range(len(stack))):
                if isinstance(stack[k], SignalNormalization):
                    del stack[k]
    return loss


def make_svi(sbn, loss, lr):
    params = list(sbn.parameters()) + list(
        getattr(loss, "baselines", torch.nn.Module()).parameters()
    )
    return ModuleSVI(sbn.model, sbn.guide, torch.optim.Adam(params, lr=lr), loss=loss)


def batches(n: int, batch_size: int, gen: torch.Generator):
    return torch.randperm(n, generator=gen).split(batch_size)


@torch.no_grad()
def evaluate(sbn, test_x) -> dict:
    with pyro.validation_enabled(False):
        nelbo = -elbo_per_datapoint(sbn.model, sbn.guide, test_x, num_samples=10).mean()
        nll = -iwae_log_likelihood(sbn.model, sbn.guide, test_x, num_samples=100).mean()
    return {"test_nelbo": float(nelbo), "test_nll_100": float(nll)}


def train(sbn, loss, train_x, args, steps=None, seconds=None) -> dict:
    """Train with ModuleSVI (dynamic binarization, row indices) for steps or seconds."""
    svi = make_svi(sbn, loss, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    done, spent = 0, 0.0
    while True:
        for idx in batches(train_x.shape[0], args.batch_size, gen):
            if (steps is not None and done >= steps) or (seconds is not None and spent >= seconds):
                return {"steps": done, "seconds": spent, "ms_per_step": 1000 * spent / done}
            x = binarize(train_x[idx])
            t0 = time.perf_counter()
            svi.step(x, idx)
            spent += time.perf_counter() - t0
            done += 1


def encoder_variance(sbn, name, train_x, args) -> dict:
    """Variance over repeated encoder-gradient estimates at fixed model parameters."""
    loss = make_loss(name, sbn, args.vimco_particles, normalize=False)
    encoder = list(sbn.encoders.parameters())
    gen = torch.Generator().manual_seed(args.seed + 1)
    baseline_params = list(getattr(loss, "baselines", torch.nn.Module()).parameters())
    opt = torch.optim.Adam(baseline_params, lr=args.lr * 10) if baseline_params else None
    # warm the baselines over the training set; the model stays fixed
    for _ in range(args.warm_epochs):
        for idx in batches(train_x.shape[0], args.batch_size, gen):
            sbn.zero_grad()
            loss.differentiable_loss(sbn.model, sbn.guide, binarize(train_x[idx]), idx).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad()
    if isinstance(loss, TraceNVIL_ELBO):
        loss.eval()
    store = pyro.get_param_store().get_state()
    idx = torch.arange(args.batch_size)
    x = binarize(train_x[idx], seed=args.seed)
    grads = []
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        sbn.zero_grad()
        loss.differentiable_loss(sbn.model, sbn.guide, x, idx).backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder]))
        pyro.get_param_store().set_state(store)  # tracegraph: same baseline every repeat
    seconds = time.perf_counter() - t0
    grads = torch.stack(grads)
    return {
        "encoder_grad_variance": float(grads.var(0).sum()),
        "encoder_grad_sq_norm_of_mean": float(grads.mean(0).pow(2).sum()),
        "variance_ms_per_estimate": 1000 * seconds / args.repeats,
    }


def run(dataset, arch, args) -> list[dict]:
    train_x, test_x = dataset.train_x, binarize(dataset.test_x, seed=1234)
    d = train_x.shape[1]
    # shared parameters for the variance measurement: nvil training from a fixed seed
    reference = make_model(arch, d, args.latent_dim, args.seed)
    pyro.clear_param_store()
    train(reference, make_loss("nvil", reference, 1), train_x, args, steps=args.pretrain)
    rows = []
    for name in args.estimators:
        pyro.set_rng_seed(args.seed)
        pyro.clear_param_store()
        frozen = make_model(arch, d, args.latent_dim, args.seed)
        frozen.load_state_dict(reference.state_dict())
        row = {"dataset": dataset.name, "arch": arch, "estimator": name}
        row.update(encoder_variance(frozen, name, train_x, args))
        for budget in ("steps", "seconds"):
            pyro.set_rng_seed(args.seed)
            pyro.clear_param_store()
            sbn = make_model(arch, d, args.latent_dim, args.seed)
            loss = make_loss(name, sbn, args.vimco_particles)
            kw = {budget: getattr(args, budget)}
            info = train(sbn, loss, train_x, args, **kw)
            ev = evaluate(sbn, test_x)
            if budget == "steps":
                row.update(ms_per_step=info["ms_per_step"], **ev)
            else:
                row.update(
                    steps_in_time=info["steps"], **{f"{k}_at_time": v for k, v in ev.items()}
                )
        rows.append(row)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["linear", "nonlinear"])
    p.add_argument("--estimators", nargs="+", default=ESTIMATORS, choices=ESTIMATORS)
    p.add_argument("--latent-dim", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--pretrain", type=int, default=500)
    p.add_argument("--warm-epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--vimco-particles", type=int, default=4)
    p.add_argument("--data-dir", default=None, help="also run on MNIST if it is here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sbn_variance.json"))
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    datasets = [load_dataset("digits")]
    if args.data_dir is not None:
        try:
            datasets.append(load_dataset("mnist", args.data_dir))
        except FileNotFoundError as e:
            print(f"skipping MNIST: {e}")
    rows = []
    for dataset in datasets:
        for arch in args.archs:
            rows.extend(run(dataset, arch, args))
    header = (
        f"{'data':8} {'arch':9} {'estimator':10} {'enc.var':>10} {'vs reinf':>8} {'ms/step':>7} "
        f"{'-ELBO@N':>8} {'NLL100@N':>8} {'-ELBO@T':>8} {'steps@T':>7}"
    )
    print(f"steps N={args.steps}, wall time T={args.seconds}s, batch {args.batch_size}")
    print(header)
    for row in rows:
        refs = [
            r["encoder_grad_variance"]
            for r in rows
            if r["estimator"] == "reinforce"
            and r["arch"] == row["arch"]
            and r["dataset"] == row["dataset"]
        ]
        ref = refs[0] if refs else float("nan")
        row["variance_ratio_to_reinforce"] = row["encoder_grad_variance"] / ref
        print(
            f"{row['dataset']:8} {row['arch']:9} {row['estimator']:10} "
            f"{row['encoder_grad_variance']:10.4g} {row['variance_ratio_to_reinforce']:8.3f} "
            f"{row['ms_per_step']:7.1f} {row['test_nelbo']:8.2f} {row['test_nll_100']:8.2f} "
            f"{row['test_nelbo_at_time']:8.2f} {row['steps_in_time']:7d}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
