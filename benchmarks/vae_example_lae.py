"""LAE against SVI on Pyro's VAE example, with the example's model and encoder as written.

The port ``tests/outside_models/vae.py`` (Pyro's ``examples/vae/vae.py`` on the embedded
8x8 digits in [0, 1]) is trained from the same initial networks per seed by SVI (the
example's guide, ``Trace_ELBO``, Adam) and by :class:`~pyro_lvm.infer.LAE` with the
library's defaults: ``LAE(vae.model, vae.encoder, Adam, latent_site="latent")``, the
encoder returning ``(z_loc, z_scale)`` and the chain moving ``fc21`` (the layer behind
``z_loc``). Each decoder is scored by AIS on the test split
(:func:`~pyro_lvm.infer.ais_log_likelihood`, no encoder involved), and the paired
difference LAE - SVI is reported per seed; ``lae-project-noise`` adds
``project_noise=True`` (the CLI recipe's default).

    python benchmarks/vae_example_lae.py [--epochs 20] [--seeds 0 1 2]

Prints a table and writes JSON to ``benchmarks/results/vae_example_lae.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from outside_models import vae as V  # noqa: E402

from pyro_lvm.infer import LAE, ais_log_likelihood  # noqa: E402

METHODS = ["svi", "lae", "lae-project-noise"]


def train(method: str, args, seed: int, x_train: torch.Tensor) -> tuple[V.VAE, dict]:
    pyro.clear_param_store()
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    vae = V.VAE(z_dim=args.z_dim, hidden_dim=args.hidden_dim, input_dim=x_train.shape[1])
    if method == "svi":
        trainer = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.lr}), loss=Trace_ELBO())
    else:
        optim = torch.optim.Adam(vae.parameters(), lr=args.lr)
        extra = {"project_noise": True} if method == "lae-project-noise" else {}
        trainer = LAE(vae.model, vae.encoder, optim, latent_site="latent", **extra)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x_train), generator=gen).split(args.batch_size):
            trainer.step(x_train[idx])
    info = {"train_seconds": time.perf_counter() - start}
    if method != "svi":
        info.update(trainer.metrics())
    return vae, info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--z-dim", type=int, default=10)
    p.add_argument("--hidden-dim", type=int, default=400)
    p.add_argument("--ais-steps", type=int, default=500)
    p.add_argument("--ais-chains", type=int, default=8)
    p.add_argument("--num-test", type=int, default=None, help="default: the whole test split")
    p.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "vae_example_lae.json")
    )
    args = p.parse_args(argv)
    x_train, x_test = V.digits()
    x_test = x_test[: args.num_test]
    rows = []
    for seed in args.seeds:
        scores = {}
        for method in METHODS:
            vae, info = train(method, args, seed, x_train)
            torch.manual_seed(10_000 + seed)  # the same AIS stream for both decoders
            ais = ais_log_likelihood(
                vae.model, x_test, num_steps=args.ais_steps, num_chains=args.ais_chains
            )
            scores[method] = ais
            row = {"method": method, "seed": seed, "ais_mean": float(ais.mean()), **info}
            if method != "svi":
                diff = scores[method] - scores["svi"]
                row["minus_svi_mean"] = float(diff.mean())
                row["minus_svi_se"] = float(diff.std() / len(diff) ** 0.5)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"args": vars(args), "rows": rows, "table": table(rows, args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(result["table"])
    return result


def table(rows: list[dict], args) -> str:
    def fmt(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"

    lines = [
        f"Pyro's VAE example on digits, {args.epochs} epochs, batch {args.batch_size}, Adam "
        f"{args.lr}; AIS {args.ais_steps} steps x {args.ais_chains} chains per test image; "
        f"median [min, max] over seeds {args.seeds}",
        "",
        "| method | AIS log p(x) per image | minus SVI (paired) | train s |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        sel = [r for r in rows if r["method"] == method]
        diff = fmt([r["minus_svi_mean"] for r in sel]) if method != "svi" else "-"
        lines.append(
            f"| {method} | {fmt([r['ais_mean'] for r in sel])} | {diff} | "
            f"{fmt([r['train_seconds'] for r in sel])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
