"""LAE against the same-network VAE on digits, under the LAE paper's protocol (8-bit
data, discretized logistic likelihood, latent 8, identical LayerNorm MLPs), printing a
comparison table. The full 3-seed study with AIS is ``benchmarks/lae_vs_vae.py``; its
results and analysis are in ``docs/langevin.md``.

    python examples/lae_vs_vae_digits.py --epochs 100 --eval-ais 1000 --out runs/lae-vs-vae
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.lifecycle import run_train

KEYS = ("test_nelbo_per_dim", "test_nll", "test_nll_ais", "accept_rate", "ms_per_step")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--num-steps", type=int, default=5)
    p.add_argument("--refine-steps", type=int, default=20)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--eval-ais", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folders and figures (temporary if omitted)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lae-vs-vae-"))
    shared = dict(
        dataset="digits",
        likelihood="logistic",
        latent_dim=8,
        hidden_dim=args.hidden_dim,
        depth=args.depth,
        layer_norm=True,
        epochs=args.epochs,
        eval_samples=args.eval_samples,
        eval_ais=args.eval_ais,
        seed=args.seed,
    )
    lae_options = dict(
        feature_norm="center",  # without it the chain freezes (docs/langevin.md)
        num_steps=args.num_steps,
        refine_steps=args.refine_steps,
    )
    runs = {
        "vae": TrainConfig(model="vae", out=str(out / "vae"), **shared),
        "lae": TrainConfig(model="lae", out=str(out / "lae"), **shared, **lae_options),
    }
    table = {}
    for name, config in runs.items():
        metrics = run_train(config, progress=False, figures=args.out is not None)
        table[name] = {k: metrics[k] for k in KEYS if k in metrics}
    result = {
        f"{model}_{key}": value for model, row in table.items() for key, value in row.items()
    }
    return result


if __name__ == "__main__":
    res = main(parse_args())
    print(f"{'model':6}" + "".join(f"{k:>20}" for k in KEYS))
    for model in ("vae", "lae"):
        cells = "".join(
            f"{res[f'{model}_{k}']:>20.4f}" if f"{model}_{k}" in res else f"{'-':>20}"
            for k in KEYS
        )
        print(f"{model:6}{cells}")
