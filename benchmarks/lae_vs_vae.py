"""LAE against the same-network VAE and DLGM (Hoffman 2017), under the LAE paper's
protocol: 8-bit data, 256-bin discretized logistic likelihood with a learned global
scale, latent dimension 8, identical fully connected networks (LayerNorm, orthogonal
init) for every method.

For each method and seed it trains through the CLI's code path (``run_train``) and
reports, on the test split, mean +- std over seeds:

- ``test_nelbo_per_dim``: the paper's number (single-sample-style negative ELBO; for LAE
  with q = N(encoder(x), test_scale^2));
- ``test_nll``: importance-weighted estimate with the run's evaluation proposal;
- ``test_nll_ais``: annealed importance sampling, the fair judge between decoders
  trained by different algorithms (``--eval-ais``);
- ``accept_rate``, ``ms_per_step``.

    python benchmarks/lae_vs_vae.py --epochs 30 --seeds 0 1 2 --eval-ais 500
    python benchmarks/lae_vs_vae.py --dataset mnist --data-dir ~/data --epochs 30

``--extra key=value`` overrides a config field for every model; ``--model-extra
model:key=value`` for one model only (e.g. ``lae:feature_norm=center``). ``--validation N``
trains on all but the last N training images and evaluates on those N (for choosing
settings without touching the test split). ``--json PATH`` also writes the summary there.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.lifecycle import run_train

KEYS = ["test_nelbo_per_dim", "test_nll", "test_nll_ais", "accept_rate", "ms_per_step"]
#: for runs evaluated with a refined proposal: the same checkpoint with the paper's proposal
PAPER_KEYS = ["paper_test_nelbo_per_dim", "paper_test_nll"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["vae", "dlgm", "lae"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--likelihood", default="logistic")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--eval-ais", type=int, default=500)
    p.add_argument("--extra", nargs="*", default=[], help="config overrides key=value")
    p.add_argument(
        "--model-extra", nargs="*", default=[], help="per-model overrides model:key=value"
    )
    p.add_argument(
        "--no-orthogonal-init", dest="orthogonal_init", action="store_false", help="default init"
    )
    p.add_argument("--validation", type=int, default=0, help="hold out the last N train images")
    p.add_argument("--json", default=None, help="also write the summary JSON here")
    p.add_argument("--out", default="runs/lae_vs_vae")
    return p.parse_args(argv)


def _override(config: TrainConfig, pairs):
    for pair in pairs:
        key, value = pair.split("=", 1)
        current = getattr(config, key)
        if isinstance(current, bool):
            value = value.lower() in ("1", "true", "yes")
        elif current is not None:
            value = type(current)(value)
        else:
            value = float(value)
        setattr(config, key, value)


def _validation_bundle(dataset: str, data_dir: str, num: int):
    """Train on all but the last ``num`` training images, evaluate on those."""
    from pyro_lvm.data import load_dataset
    from pyro_lvm.data.bundle import DataBundle

    full = load_dataset(dataset, data_dir)
    if not 0 < num < full.num_train:
        raise ValueError(f"--validation must be in (0, {full.num_train}), got {num}")
    y = full.train_y
    return DataBundle(
        f"{full.name}-validation",
        full.train_x[:-num],
        full.train_x[-num:],
        None if y is None else y[:-num],
        None if y is None else y[-num:],
        image_shape=full.image_shape,
    )


def _paper_proposal_metrics(config: TrainConfig, bundle) -> dict:
    """Re-evaluate the saved LAE run with the paper's proposal N(encoder(x), s^2 I)."""
    import dataclasses

    from pyro_lvm.experiments.checkpoint import CHECKPOINT_NAME
    from pyro_lvm.experiments.evaluation import evaluate
    from pyro_lvm.experiments.lifecycle import setup_run
    from pyro_lvm.experiments.trainer import Trainer

    experiment, data = setup_run(config, bundle)
    trainer = Trainer(experiment, data, config.batch_size, None, config.seed, config.device)
    trainer.restore(Path(config.out) / CHECKPOINT_NAME)
    experiment = dataclasses.replace(experiment, eval_guide=None)  # lvm.guide: the paper's
    out = evaluate(experiment, data.test_x, eval_samples=config.eval_samples, device=config.device)
    return {
        "paper_test_nelbo_per_dim": out["test_nelbo_per_dim"],
        "paper_test_nll": out["test_nll"],
    }


def main(args) -> dict:
    results: dict[str, list[dict]] = {}
    bundle = None
    if args.validation:
        bundle = _validation_bundle(args.dataset, args.data_dir, args.validation)
    for model in args.models:
        for seed in args.seeds:
            config = TrainConfig(
                model=model,
                dataset=args.dataset,
                data_dir=args.data_dir,
                epochs=args.epochs,
                batch_size=args.batch_size,
                hidden_dim=args.hidden_dim,
                depth=args.depth,
                layer_norm=True,
                orthogonal_init=args.orthogonal_init,
                latent_dim=args.latent_dim,
                lr=args.lr,
                likelihood=args.likelihood,
                eval_samples=args.eval_samples,
                eval_ais=args.eval_ais,
                seed=seed,
                out=f"{args.out}/{model}-seed{seed}",
            )
            _override(config, args.extra)
            _override(
                config,
                [p.split(":", 1)[1] for p in args.model_extra if p.split(":", 1)[0] == model],
            )
            metrics = run_train(config, progress=False, figures=False, data=bundle)
            if model == "lae" and config.refine_steps > 0:
                metrics.update(_paper_proposal_metrics(config, bundle))
            results.setdefault(model, []).append(metrics)
    table = {}
    for model, runs in results.items():
        row = {}
        for key in KEYS + PAPER_KEYS:
            values = [r[key] for r in runs if key in r]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                row[key] = (statistics.mean(values), sd)
        table[model] = row
    print(f"{'model':6}" + "".join(f"{k:>24}" for k in KEYS))
    for model, row in table.items():
        cells = "".join(
            f"{row[k][0]:>15.4f} +- {row[k][1]:<6.4f}" if k in row else f"{'-':>24}" for k in KEYS
        )
        print(f"{model:6}{cells}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"args": vars(args), "table": table, "runs": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=float))
    return summary


if __name__ == "__main__":
    main(parse_args())
