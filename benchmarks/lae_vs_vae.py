"""LAE against the same-network VAE, VAE-flow and DLGM (Hoffman 2017) under the LAE
paper's protocol (8-bit data, discretized logistic likelihood, latent 8, LayerNorm MLPs
with orthogonal init): a thin call of :func:`pyro_lvm.experiments.compare.compare`,
equivalent to

    pyro-lvm compare --models vae vae-flow dlgm lae --seeds 0 1 2 --likelihood logistic \\
        --layer-norm --orthogonal-init --depth 3 --epochs 30 --eval-ais 500 --out DIR

    python benchmarks/lae_vs_vae.py --epochs 30 --seeds 0 1 2 --eval-ais 500
    python benchmarks/lae_vs_vae.py --dataset mnist --data-dir ~/data --epochs 30

``--extra key=value`` overrides a setting for every model, ``--model-extra
model:key=value`` for one model only (e.g. ``lae:num_steps=5``);
``--no-orthogonal-init`` uses PyTorch's default init. ``--json PATH`` also writes
``compare.json`` there. Runs already finished in ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from pyro_lvm.experiments.compare import DEFAULT_MODELS, compare
from pyro_lvm.experiments.config import TrainConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
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
    p.add_argument("--validation", type=int, default=0, help="hold out N training rows")
    p.add_argument("--extra", nargs="*", default=[], help="setting overrides key=value")
    p.add_argument("--model-extra", nargs="*", default=[], help="model:key=value overrides")
    p.add_argument(
        "--no-orthogonal-init", dest="orthogonal_init", action="store_false", help="default init"
    )
    p.add_argument("--json", default=None, help="also write compare.json here")
    p.add_argument("--out", default="runs/lae_vs_vae")
    return p.parse_args(argv)


def _settings(args) -> TrainConfig:
    config = TrainConfig(
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
        validation=args.validation,
    )
    for key, value in _pairs(args.extra, config).items():
        setattr(config, key, value)
    return config


def _pairs(pairs, config: TrainConfig) -> dict:
    """``key=value`` strings as typed settings."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        if key not in known:
            raise SystemExit(f"{pair}: unknown setting {key!r}")
        current = getattr(config, key)
        if isinstance(current, bool):
            value = value.lower() in ("1", "true", "yes")
        elif current is not None:
            value = type(current)(value)
        else:
            value = float(value)
        out[key] = value
    return out


def _model_settings(args, config: TrainConfig) -> dict:
    per_model: dict[str, list[str]] = {}
    for item in args.model_extra:
        model, pair = item.split(":", 1)
        per_model.setdefault(model, []).append(pair)
    return {model: _pairs(pairs, config) for model, pairs in per_model.items()}


def main(args) -> list[dict]:
    settings = _settings(args)
    results = compare(
        args.models, args.seeds, settings, args.out, model_settings=_model_settings(args, settings)
    )
    print((Path(args.out) / "compare.md").read_text())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.out) / "compare.json", args.json)
    return json.loads((Path(args.out) / "compare.json").read_text()) if results else []


if __name__ == "__main__":
    main(parse_args())
