"""``pyro-lvm``: train, evaluate and sample latent variable models from the shell.

::

    pyro-lvm train MODEL [--dataset NAME] [--epochs N] ... [--out DIR] [--resume DIR]
    pyro-lvm evaluate RUN_DIR [--eval-samples K] [--eval-ais STEPS]
    pyro-lvm sample RUN_DIR [--num N]
    pyro-lvm compare [--models M ...] [--seeds S ...] [any train flag] --out DIR

Each run directory holds ``config.json``, ``checkpoint.pt``, ``metrics.json`` and PNG
figures. Bad input exits non-zero with a one-line message.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from pyro_lvm import __version__
from pyro_lvm.data import DATASETS
from pyro_lvm.experiments.config import COMPILE_MIN_STEPS, TrainConfig
from pyro_lvm.experiments.fabric import is_global_zero
from pyro_lvm.experiments.lifecycle import export_run, run_evaluate, run_sample, run_train
from pyro_lvm.experiments.recipes import RECIPES, model_flags
from pyro_lvm.experiments.recipes.custom import TRACEBACK_VARIABLE, ModelFileError, user_code_error
from pyro_lvm.experiments.settings import compare_config, default_threads, train_config
from pyro_lvm.infer.diagnostics import DivergenceError

__all__ = ["main", "build_parser"]

_DEFAULTS = TrainConfig()


def _help(text: str, field: str | None = None) -> str:
    if field is None:
        return text
    return f"{text} (default: {getattr(_DEFAULTS, field)})"


# (flags, options, group) of every train flag; dest names are TrainConfig fields unless
# listed in _RUN_OPTIONS. Which flags a model takes: pyro_lvm.experiments.recipes.MODEL_FLAGS.
_TRAIN_FLAGS = [
    (
        ("--config",),
        dict(metavar="FILE", help="JSON settings (a run's config.json); flags override"),
        "run",
    ),
    (("--dataset",), dict(choices=DATASETS, help=_help("dataset", "dataset")), "data"),
    (("--data-dir",), dict(help=_help("folder holding torchvision datasets", "data_dir")), "data"),
    (("--download",), dict(action="store_true", help="download a missing dataset"), "data"),
    (
        ("--likelihood",),
        dict(
            choices=["bernoulli", "gaussian", "logistic"],
            help="observation model (default: gaussian for ppca, else bernoulli)",
        ),
        "data",
    ),
    (
        ("--validation",),
        dict(
            type=int,
            metavar="N",
            help=_help("training rows held out for validation", "validation"),
        ),
        "data",
    ),
    (("--epochs",), dict(type=int, help=_help("total epochs", "epochs")), "training"),
    (("--batch-size",), dict(type=int, help=_help("minibatch size", "batch_size")), "training"),
    (("--lr",), dict(type=float, help=_help("learning rate", "lr")), "training"),
    (
        ("--optimizer",),
        dict(choices=["adam", "sgd"], help=_help("optimizer", "optimizer")),
        "training",
    ),
    (
        ("--lr-schedule",),
        dict(
            choices=["none", "cosine", "step"],
            help=_help("per-epoch learning-rate schedule", "lr_schedule"),
        ),
        "training",
    ),
    (
        ("--lr-step",),
        dict(type=int, metavar="EPOCHS", help=_help("step schedule: epochs per decay", "lr_step")),
        "training",
    ),
    (
        ("--lr-gamma",),
        dict(type=float, help=_help("step schedule: decay factor", "lr_gamma")),
        "training",
    ),
    (
        ("--clip-norm",),
        dict(type=float, help="clip the global gradient norm (default: off)"),
        "training",
    ),
    (
        ("--early-stopping",),
        dict(
            type=int,
            metavar="EPOCHS",
            help=_help("stop after EPOCHS without improvement (0: off)", "early_stopping"),
        ),
        "training",
    ),
    (("--seed",), dict(type=int, help=_help("seed of every generator", "seed")), "training"),
    (("--latent-dim",), dict(type=int, help=_help("latent dimension", "latent_dim")), "model"),
    (("--hidden-dim",), dict(type=int, help=_help("hidden units", "hidden_dim")), "model"),
    (("--depth",), dict(type=int, help=_help("hidden layers per network", "depth")), "model"),
    (("--layer-norm",), dict(action="store_true", help="LayerNorm in hidden layers"), "model"),
    (
        ("--orthogonal-init",),
        dict(action="store_true", help="orthogonal weights, zero biases"),
        "model",
    ),
    (
        ("--arch",),
        dict(choices=["mlp", "conv"], help=_help("network family (conv: image data)", "arch")),
        "model",
    ),
    (("--num-flows",), dict(type=int, help=_help("normalizing flows", "num_flows")), "model"),
    (("--flow",), dict(choices=["iaf", "planar"], help=_help("flow kind", "flow")), "model"),
    (("--analytic-kl",), dict(action="store_true", help="TraceMeanField_ELBO"), "model"),
    (
        ("--no-analytic-kl",),
        dict(dest="analytic_kl", action="store_false", help="Monte Carlo KL (Trace_ELBO)"),
        "model",
    ),
    (
        ("--no-jit",),
        dict(
            dest="jit_compile",
            action="store_false",
            help="run the model eagerly (default: compiled with Inductor for runs of "
            f"{COMPILE_MIN_STEPS:,} steps or more)",
        ),
        "model",
    ),
    (
        ("--model-file",),
        dict(metavar="PATH.py:NAME|MODULE:NAME", help="your model's build function"),
        "model",
    ),
    (
        ("--num-steps",),
        dict(type=int, help=_help("transitions T per batch", "num_steps")),
        "langevin",
    ),
    (("--step-size",), dict(type=float, help="initial step size (default: searched)"), "langevin"),
    (
        ("--target-accept-prob",),
        dict(type=float, help=_help("target acceptance", "target_accept_prob")),
        "langevin",
    ),
    (("--no-mh",), dict(dest="mh", action="store_false", help="unadjusted Langevin"), "langevin"),
    (
        ("--no-adapt-step-size",),
        dict(dest="adapt_step_size", action="store_false", help="fixed step size"),
        "langevin",
    ),
    (
        ("--test-scale",),
        dict(type=float, help=_help("q = N(encoder(x), s^2)", "test_scale")),
        "langevin",
    ),
    (
        ("--refine-steps",),
        dict(type=int, help=_help("test-time MALA steps", "refine_steps")),
        "langevin",
    ),
    (
        ("--precondition",),
        dict(
            type=float,
            metavar="LAMBDA",
            help="per-batch feature preconditioning with damping LAMBDA (default: off)",
        ),
        "langevin",
    ),
    (
        ("--feature-norm",),
        dict(
            choices=["none", "center", "standardize"],
            help=_help("running normalisation of encoder features", "feature_norm"),
        ),
        "langevin",
    ),
    (
        ("--jacobian",),
        dict(
            action="store_true",
            help="correct the trunk's gradient for the chain layer's Jacobian (the "
            "default; docs/langevin.md)",
        ),
        "langevin",
    ),
    (
        ("--no-jacobian",),
        dict(dest="jacobian", action="store_false", help="no Jacobian correction"),
        "langevin",
    ),
    (
        ("--project-noise",),
        dict(
            action="store_true",
            help="LAE: draw the chain weight's proposal noise in the batch's feature span "
            "only (the batch's latents move exactly as without; the default; "
            "docs/langevin.md)",
        ),
        "langevin",
    ),
    (
        ("--no-project-noise",),
        dict(
            dest="project_noise",
            action="store_false",
            help="isotropic proposal noise on the whole chain weight (the paper's ALD)",
        ),
        "langevin",
    ),
    (
        ("--estimator",),
        dict(help=_help("reinforce|tracegraph|nvil|vimco|disarm", "estimator")),
        "model",
    ),
    (("--num-particles",), dict(type=int, help=_help("particles", "num_particles")), "model"),
    (("--num-layers",), dict(type=int, help=_help("stochastic layers", "num_layers")), "model"),
    (("--fit",), dict(help=_help("svi|gradient|closed-form|em", "fit")), "model"),
    (
        ("--num-components",),
        dict(type=int, help=_help("mixture components", "num_components")),
        "model",
    ),
    (
        ("--eval-samples",),
        dict(type=int, help=_help("importance samples K", "eval_samples")),
        "evaluation",
    ),
    (
        ("--eval-ais",),
        dict(type=int, metavar="STEPS", help=_help("AIS steps (0: off)", "eval_ais")),
        "evaluation",
    ),
    (("--device",), dict(help=_help("cpu or cuda", "device")), "run"),
    (
        ("--devices",),
        dict(type=int, metavar="N", help=_help("processes per node (data parallel)", "devices")),
        "distributed",
    ),
    (
        ("--strategy",),
        dict(choices=["ddp"], help=_help("data-parallel strategy", "strategy")),
        "distributed",
    ),
    (
        ("--accelerator",),
        dict(choices=["cpu", "gpu"], help="cpu or gpu (default: from --device; gpu = cuda)"),
        "distributed",
    ),
    (
        ("--num-nodes",),
        dict(type=int, metavar="K", help=_help("machines (SLURM, torchrun)", "num_nodes")),
        "distributed",
    ),
    (("--out",), dict(help="run directory (default: runs/MODEL-DATASET)"), "run"),
    (("--resume",), dict(metavar="DIR", help="continue the run in DIR"), "run"),
    (("--overwrite",), dict(action="store_true", help="replace the run already in --out"), "run"),
    (("--no-figures",), dict(action="store_true", help="skip the PNG figures"), "run"),
    (("--no-progress",), dict(action="store_true", help="no progress bar"), "run"),
    (
        ("--logger",),
        dict(
            choices=["csv", "tensorboard", "mlflow", "wandb"],
            help="experiment tracker besides OUT/logs/metrics.csv (default: csv, none)",
        ),
        "run",
    ),
    (
        ("--threads",),
        dict(type=int, help="torch CPU threads (default: 1 for digits, else torch's)"),
        "run",
    ),
]


def _dest(flags: tuple[str, ...], options: dict) -> str:
    return options.get("dest", flags[0].lstrip("-").replace("-", "_"))


class _Parser(argparse.ArgumentParser):
    """Errors are one line (``pyro-lvm: error: ...``) naming the fix."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            flag = message.split(":", 1)[1].split()[0]
            where = getattr(self, "_where", None) or self.prog.replace("pyro-lvm", "").strip()
            message = (
                f"{flag} does not apply to {where}; `pyro-lvm {where} --help` lists its flags"
                if where
                else f"unknown argument {flag}; `pyro-lvm --help` lists the commands"
            )
        self.exit(2, f"pyro-lvm: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-lvm", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"pyro-lvm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model and evaluate it on the test split")
    models = t.add_subparsers(dest="model", required=True, metavar="MODEL", parser_class=_Parser)
    for name in sorted(RECIPES):
        _add_model_parser(models, name)

    e = sub.add_parser("evaluate", help="re-evaluate a trained run")
    e.add_argument("run_dir")
    e.add_argument("--eval-samples", type=int, default=1000, help="importance samples K")
    e.add_argument("--eval-ais", type=int, default=0, metavar="STEPS", help="AIS steps")
    e.add_argument("--device", default=None, help="cpu or cuda (default: the run's)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--model-file", default=None, help="a custom-model run's code (trusted)")

    x = sub.add_parser(
        "export", help="write a run's model as model.safetensors + config.json (no pickles)"
    )
    x.add_argument("run_dir")
    x.add_argument("out", help="folder for model.safetensors and config.json")
    x.add_argument(
        "--checkpoint",
        default="checkpoint.pt",
        choices=["checkpoint.pt", "best.pt"],
        help="the last epoch or the best monitored loss (default: checkpoint.pt)",
    )
    x.add_argument("--model-file", default=None, help="a custom-model run's code (trusted)")
    x.add_argument("--overwrite", action="store_true", help="replace an export in OUT")
    x.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run_dir")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--model-file", default=None, help="a custom-model run's code (trusted)")
    _add_compare_parser(sub)
    return parser


def _add_model_parser(models, name: str) -> None:
    allowed = model_flags(name)
    # flags are absent from the namespace unless given (SUPPRESS), so --resume and
    # --config can tell a flag the user passed from a default (defaults: TrainConfig)
    m = models.add_parser(
        name,
        help=f"train {name}",
        description=f"Train {name} and evaluate it on the test split.",
        argument_default=argparse.SUPPRESS,
    )
    m._where = f"train {name}"
    groups = {}
    for flags, options, group in _TRAIN_FLAGS:
        dest = _dest(flags, options)
        if allowed is not None and dest not in allowed:
            continue
        if group not in groups:
            groups[group] = m.add_argument_group(group)
        groups[group].add_argument(*flags, **options)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = str(message).strip().splitlines()[0] if str(message).strip() else ""
    return f"pyro-lvm: warning: {text}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in ("train", "evaluate", "sample", "compare"):
        # for "--flag does not apply to train MODEL" (argparse reports at the top level)
        parser._where = " ".join(argv[:2]) if argv[0] == "train" and len(argv) > 1 else argv[0]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and one-line usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    warnings.formatwarning = _one_line_warning
    flags = vars(args)
    try:
        threads = default_threads(args.command, flags)
        if threads is not None:
            torch.set_num_threads(threads)
        if args.command == "train":
            config = train_config(
                args.model, flags, config_file=flags.get("config"), resume=flags.get("resume")
            )
            flags["model_file"] = config.model_file  # whose errors are the user's
            metrics = run_train(
                config,
                resume=flags.get("resume") is not None,
                progress=not flags.get("no_progress", False),
                figures=not flags.get("no_figures", False),
                overwrite=flags.get("overwrite", False),
            )
            if is_global_zero():  # data parallel: rank 0 speaks for the run
                _print_summary(metrics, config.out)
        elif args.command == "evaluate":
            metrics = run_evaluate(
                args.run_dir, args.eval_samples, args.eval_ais, args.device, args.model_file
            )
            _print_summary(metrics, args.run_dir)
        elif args.command == "compare":
            _run_compare(args)
        elif args.command == "export":
            out = export_run(
                args.run_dir, args.out, args.checkpoint, args.model_file, args.overwrite
            )
            print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
        else:
            path = run_sample(args.run_dir, args.num, args.seed, args.model_file)
            print(f"wrote {path}")
    except Exception as err:
        return _report(err, flags.get("model_file"))
    return 0


def _report(err: Exception, model_file: str | None) -> int:
    """Print a user-fixable error in one line (exit 2); re-raise our own bugs."""
    user = user_code_error(err, model_file) if model_file else None
    if user is not None:
        err = user
    elif not isinstance(err, (ValueError, FileNotFoundError, DivergenceError, OSError)):
        raise err
    if isinstance(err, ModelFileError) and os.environ.get(TRACEBACK_VARIABLE):
        raise err
    if getattr(err, "quiet", False):  # data parallel: another process reported it
        return 2
    message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
    print(f"pyro-lvm: error: {message}", file=sys.stderr)
    return 2


def _print_summary(metrics: dict, out) -> None:
    keys = [
        "test_nelbo",
        "test_nll",
        "test_nll_per_dim",
        "test_nll_fixed",
        "test_nll_ais",
        "accept_rate",
        "step_size",
        "ms_per_step",
    ]
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)
    print(f"{metrics['model']} on {metrics['dataset']}: {shown}")
    if metrics.get("warnings"):
        print(f"training health warnings: {', '.join(metrics['warnings'])} (see metrics.json)")
    print(f"wrote {Path(out) / 'metrics.json'} and figures")


# ---- pyro-lvm compare -------------------------------------------------------------

#: train flags that make no sense for a comparison (each run has its own folder)
_NOT_FOR_COMPARE = ("config", "out", "resume", "overwrite", "no_figures", "model_file")


def _add_compare_parser(sub) -> None:
    from pyro_lvm.experiments.compare import DEFAULT_MODELS

    c = sub.add_parser(
        "compare",
        help="train several models with identical settings and seeds; tabulate them",
        description="Train each model for each seed with the same settings, evaluate them "
        "the same way, write DIR/compare.json, compare.md and compare.png. Finished runs "
        "in DIR/MODEL-seedS are reused, not retrained.",
        argument_default=argparse.SUPPRESS,
    )
    c.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL")
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S")
    c.add_argument("--out", required=True, metavar="DIR", help="comparison folder")
    c.add_argument(
        "--no-sample-quality",
        dest="sample_quality",
        action="store_false",
        default=True,
        help="skip the classifier-feature Frechet distance",
    )
    groups = {}
    for flags, options, group in _TRAIN_FLAGS:
        if _dest(flags, options) in _NOT_FOR_COMPARE:
            continue
        if group not in groups:
            groups[group] = c.add_argument_group(group)
        groups[group].add_argument(*flags, **options)


def _run_compare(args) -> None:
    from pyro_lvm.experiments.compare import compare

    settings = compare_config(vars(args))

    def show(event) -> None:
        where = f"[{event.index}/{event.total}] {event.model} seed {event.seed}"
        if event.kind == "done":
            m = event.metrics
            shown = ", ".join(
                f"{k} {m[k]:.4g}"
                for k in ("test_nelbo_per_dim", "test_nll", "test_nll_ais", "sample_frechet")
                if isinstance(m.get(k), float)
            )
            print(f"{where}: {shown}", flush=True)
        else:
            print(f"{where}: {event.kind} in {event.run_dir}", file=sys.stderr, flush=True)

    compare(
        args.models,
        args.seeds,
        settings,
        args.out,
        sample_quality=args.sample_quality,
        progress=not getattr(args, "no_progress", False),
        callback=show,
    )
    out = Path(args.out)
    print((out / "compare.md").read_text())
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and {out / 'compare.png'}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
