"""``pyro-lvm``: train, evaluate and sample latent variable models from the shell.

::

    pyro-lvm train MODEL [--dataset NAME] [--epochs N] ... [--out DIR] [--resume DIR]
    pyro-lvm evaluate RUN_DIR [--eval-samples K] [--eval-ais STEPS]
    pyro-lvm sample RUN_DIR [--num N]

Each run directory holds ``config.json``, ``checkpoint.pt``, ``metrics.json`` and PNG
figures. Bad input exits non-zero with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch

from pyro_lvm.checkpoint import CHECKPOINT_NAME, atomic_save
from pyro_lvm.config import TrainConfig
from pyro_lvm.data import DATASETS, DataBundle, load_dataset
from pyro_lvm.evaluation import evaluate
from pyro_lvm.infer.diagnostics import DivergenceError
from pyro_lvm.models.likelihoods import make_likelihood
from pyro_lvm.recipes import RECIPES, Experiment, get_recipe
from pyro_lvm.trainer import Trainer

__all__ = ["main", "build_parser", "run_train", "run_evaluate", "run_sample", "setup_run"]

DEFAULT_LIKELIHOOD = {"ppca": "gaussian"}


class CLIError(Exception):
    """Bad input from the command line (printed as one line, exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-lvm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and evaluate it on the test split")
    t.add_argument("model", choices=sorted(RECIPES), help="model to train")
    t.add_argument("--dataset", default="digits", choices=DATASETS)
    t.add_argument("--data-dir", default="data", help="folder holding torchvision datasets")
    t.add_argument("--download", action="store_true", help="download a missing dataset")
    t.add_argument("--epochs", type=int, default=None, help="total epochs (default 50)")
    t.add_argument("--batch-size", type=int, default=100)
    t.add_argument("--latent-dim", type=int, default=8)
    t.add_argument("--hidden-dim", type=int, default=256)
    t.add_argument("--depth", type=int, default=2, help="hidden layers per network")
    t.add_argument("--layer-norm", action="store_true", help="LayerNorm in hidden layers")
    t.add_argument(
        "--orthogonal-init", action="store_true", help="orthogonal weights, zero biases"
    )
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    t.add_argument("--likelihood", choices=["bernoulli", "gaussian", "logistic"], default=None)
    t.add_argument("--analytic-kl", action="store_true", help="TraceMeanField_ELBO (vae)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-samples", type=int, default=1000, help="importance samples K")
    t.add_argument("--eval-ais", type=int, default=0, metavar="STEPS", help="AIS steps (0: off)")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--out", default=None, help="run directory (default runs/MODEL-DATASET)")
    t.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    t.add_argument("--no-figures", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for the tiny digits networks, else torch's)",
    )
    g = t.add_argument_group("Langevin (lae, dlgm)")
    g.add_argument("--langevin-steps", type=int, default=2, help="transitions T per batch")
    g.add_argument("--step-size", type=float, default=None, help="initial step size")
    g.add_argument("--target-accept", type=float, default=0.574)
    g.add_argument("--no-mh", dest="mh", action="store_false", help="unadjusted Langevin")
    g.add_argument("--no-adapt", dest="adapt", action="store_false", help="fixed step size")
    g.add_argument("--test-scale", type=float, default=0.05, help="q = N(encoder(x), s^2)")
    g.add_argument("--refine-steps", type=int, default=0, help="test-time MALA steps")
    g.add_argument(
        "--precondition",
        type=float,
        default=None,
        metavar="LAMBDA",
        help="lae: per-batch feature preconditioning with damping LAMBDA (off by default)",
    )
    g.add_argument(
        "--feature-norm",
        choices=["none", "center", "standardize"],
        default="center",
        help="lae: running-statistics centring of the encoder features before the chain layer",
    )
    g = t.add_argument_group("Bernoulli latents (sbn)")
    g.add_argument("--estimator", default="nvil", help="reinforce|tracegraph|nvil|vimco|disarm")
    g.add_argument("--num-particles", type=int, default=1)
    g.add_argument("--num-layers", type=int, default=1)
    g = t.add_argument_group("other models")
    g.add_argument("--fit", default="svi", help="ppca: svi|gradient|closed-form|em")
    g.add_argument("--num-components", type=int, default=10, help="ae-gmm mixture size")

    e = sub.add_parser("evaluate", help="re-evaluate a trained run")
    e.add_argument("run_dir")
    e.add_argument("--eval-samples", type=int, default=1000)
    e.add_argument("--eval-ais", type=int, default=0, metavar="STEPS")
    e.add_argument("--device", default=None)

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run_dir")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    return parser


# -- building a run ---------------------------------------------------------------------
def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device} requested but CUDA is not available; use --device cpu")


def setup_run(
    config: TrainConfig, data: DataBundle | None = None
) -> tuple[Experiment, DataBundle]:
    """Seed, load the data and build the experiment described by ``config``."""
    config.validate()
    _check_device(config.device)
    # the data are checked once up front; per-step argument validation only costs time
    pyro.enable_validation(False)
    pyro.set_rng_seed(config.seed)
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, config.download)
    data = data.for_likelihood(config.likelihood)
    likelihood = make_likelihood(config.likelihood)
    experiment = get_recipe(config.model).build(config, data.data_dim, likelihood)
    experiment.modules.to(config.device)
    return experiment, data


def _config_from_args(args) -> TrainConfig:
    if args.resume is not None:
        run = Path(args.resume)
        if not (run / "config.json").is_file() or not (run / CHECKPOINT_NAME).is_file():
            raise CLIError(
                f"--resume {run} is not a pyro-lvm run (needs config.json and "
                f"{CHECKPOINT_NAME}); pass the --out folder of an earlier run"
            )
        config = TrainConfig.load(run / "config.json")
        if config.model != args.model:
            raise CLIError(f"--resume {run} is a {config.model!r} run, not {args.model!r}")
        config.out = str(run)
        if args.epochs is not None:
            config.epochs = args.epochs
        return config
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    fields["epochs"] = 50 if args.epochs is None else args.epochs
    fields["likelihood"] = args.likelihood or DEFAULT_LIKELIHOOD.get(args.model, "bernoulli")
    fields["out"] = args.out or f"runs/{args.model}-{args.dataset}"
    return TrainConfig(**fields)


def _tensorboard(out: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(str(out / "tensorboard"))
    except Exception:  # optional dependency: absent or broken means no TensorBoard
        return None


def run_train(
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    figures: bool = True,
    data: DataBundle | None = None,
) -> dict:
    """Train, evaluate and write ``metrics.json`` (+ figures); returns the metrics."""
    out = Path(config.out)
    experiment, data = setup_run(config, data)
    trainer = Trainer(experiment, data, config.batch_size, out, config.seed, config.device)
    if resume:
        trainer.restore(out / CHECKPOINT_NAME)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.json")
    prepare = getattr(experiment.inference, "prepare", None)
    if prepare is not None and trainer.state.step == 0:
        prepare(data.train_x.to(config.device))
    writer = _tensorboard(out)
    bar = _progress_bar(config, data, trainer, enabled=progress)

    def on_step(state, loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix({"loss": f"{loss:.2f}", **_short(experiment.inference.metrics())})

    def on_epoch(state, record):
        if writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(f"train/{key}", value, record["epoch"])

    previous = signal.getsignal(signal.SIGINT)

    def request_stop(signum, frame):
        trainer.stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    try:
        trainer.fit(config.epochs, on_step=on_step, on_epoch=on_epoch)
    except KeyboardInterrupt:
        raise CLIError(
            f"interrupted at epoch {trainer.state.epoch + 1}, step {trainer.state.step}; "
            f"checkpoint saved, continue with --resume {out}"
        ) from None
    except DivergenceError as err:
        raise CLIError(
            f"{err} (at step {trainer.state.step + 1}; last good checkpoint kept in {out})"
        ) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
    finalize = getattr(experiment.inference, "finalize", None)
    if finalize is not None:  # post-training fits, e.g. the mixture prior of ae-gmm
        finalize(data.train_x.to(config.device))
        trainer.save()  # evaluate/sample must see the fitted state
    metrics = _metrics(config, experiment, data, trainer)
    if writer is not None:
        for key, value in metrics.items():
            if isinstance(value, float):
                writer.add_scalar(f"test/{key}", value, config.epochs)
        writer.close()
    _write_json(out / "metrics.json", metrics)
    _write_json(
        out / "history.json", {"epochs": trainer.state.history, "steps": trainer.state.steps}
    )
    if figures:
        from pyro_lvm.figures import write_figures

        write_figures(experiment, data, trainer.state, out)
    return metrics


def _short(metrics: dict) -> dict:
    return {k: f"{v:.3g}" for k, v in metrics.items() if isinstance(v, float)}


def _progress_bar(config, data, trainer, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    per_epoch = -(-data.num_train // config.batch_size)
    return tqdm(
        total=config.epochs * per_epoch,
        initial=trainer.state.step,
        desc=f"{config.model} on {data.name}",
        unit="step",
        file=sys.stderr,
    )


def _metrics(config, experiment, data, trainer) -> dict:
    t0 = time.perf_counter()
    metrics = {
        "model": config.model,
        "dataset": data.name,
        "num_train": data.num_train,
        "num_test": data.num_test,
        "data_dim": data.data_dim,
        "latent_dim": config.latent_dim,
        "epochs": trainer.state.epoch,
        "steps": trainer.state.step,
        "train_seconds": trainer.state.train_seconds,
        "ms_per_step": trainer.ms_per_step,
        "likelihood": config.likelihood,
        "seed": config.seed,
    }
    metrics.update(experiment.inference.metrics())
    metrics.update(
        evaluate(
            experiment,
            data.test_x,
            eval_samples=config.eval_samples,
            eval_ais=config.eval_ais,
            device=config.device,
        )
    )
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    tmp.replace(path)


def _load_run(run_dir: str, device: str | None = None):
    run = Path(run_dir)
    if not (run / "config.json").is_file() or not (run / CHECKPOINT_NAME).is_file():
        raise CLIError(
            f"{run} is not a pyro-lvm run (needs config.json and {CHECKPOINT_NAME}); pass "
            "the --out folder of a training run"
        )
    config = TrainConfig.load(run / "config.json")
    if device is not None:
        config.device = device
    experiment, data = setup_run(config)
    trainer = Trainer(experiment, data, config.batch_size, None, config.seed, config.device)
    trainer.restore(run / CHECKPOINT_NAME)
    return config, experiment, data, trainer


def run_evaluate(
    run_dir: str, eval_samples: int = 1000, eval_ais: int = 0, device: str | None = None
) -> dict:
    """Re-evaluate a run; updates and returns its ``metrics.json``."""
    config, experiment, data, trainer = _load_run(run_dir, device)
    config.eval_samples, config.eval_ais = eval_samples, eval_ais
    config.validate()
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    fresh = _metrics(config, experiment, data, trainer)
    for key in ("train_seconds", "ms_per_step"):  # keep the training run's timings
        fresh[key] = metrics.get(key, fresh[key])
    metrics.update(fresh)
    _write_json(metrics_path, metrics)
    return metrics


def run_sample(run_dir: str, num: int = 64, seed: int = 0) -> Path:
    """Draw ``num`` samples from a run: writes ``samples.pt`` and ``samples.png``."""
    if num <= 0:
        raise CLIError(f"--num must be positive, got {num}")
    config, experiment, data, _ = _load_run(run_dir)
    pyro.set_rng_seed(seed)
    x = experiment.lvm.generate(num).cpu()
    run = Path(run_dir)
    atomic_save(x, run / "samples.pt")
    if data.image_shape is not None:
        from pyro_lvm.figures import save_sample_grid

        save_sample_grid(x, data, experiment, run / "samples.png")
    return run / "samples.pt"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is None and getattr(args, "dataset", None) == "digits":
            args.threads = 1  # 8x8 inputs: threading overhead exceeds the arithmetic
        if getattr(args, "threads", None) is not None:
            if args.threads <= 0:
                raise CLIError(f"--threads must be positive, got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.command == "train":
            config = _config_from_args(args)
            metrics = run_train(
                config,
                resume=args.resume is not None,
                progress=not args.no_progress,
                figures=not args.no_figures,
            )
            _print_summary(metrics, config.out)
        elif args.command == "evaluate":
            metrics = run_evaluate(args.run_dir, args.eval_samples, args.eval_ais, args.device)
            _print_summary(metrics, args.run_dir)
        else:
            path = run_sample(args.run_dir, args.num, args.seed)
            print(f"wrote {path}")
    except (CLIError, ValueError, FileNotFoundError, DivergenceError) as err:
        print(f"pyro-lvm: error: {err}", file=sys.stderr)
        return 2
    return 0


def _print_summary(metrics: dict, out) -> None:
    keys = [
        "test_nelbo",
        "test_nll",
        "test_nll_per_dim",
        "test_nll_ais",
        "accept_rate",
        "step_size",
        "ms_per_step",
    ]
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)
    print(f"{metrics['model']} on {metrics['dataset']}: {shown}")
    print(f"wrote {Path(out) / 'metrics.json'} and figures")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
