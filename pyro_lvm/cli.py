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
import json
import sys
import warnings
from pathlib import Path

import torch

from pyro_lvm import __version__
from pyro_lvm.data import DATASETS
from pyro_lvm.experiments.build import RunError
from pyro_lvm.experiments.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME, load_checkpoint
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.export import export_run
from pyro_lvm.experiments.fabric import is_global_zero
from pyro_lvm.experiments.lifecycle import read_config, run_evaluate, run_sample, run_train
from pyro_lvm.experiments.recipes import RECIPES, model_flags
from pyro_lvm.infer.diagnostics import DivergenceError

__all__ = ["main", "build_parser"]

DEFAULT_LIKELIHOOD = {"ppca": "gaussian"}


#: settings a resumed run may change (the rest define the run and must match it)
RESUMABLE = (
    "epochs",
    "logger",
    "lr",
    "eval_samples",
    "eval_ais",
    "device",
    "devices",
    "strategy",
    "num_nodes",
)
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
            help="run the model eagerly instead of replaying its compiled trace",
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
            help="correct the trunk's gradient for the chain layer's Jacobian (centred "
            "features; the default; docs/langevin.md)",
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
            model = getattr(self, "_model", None)
            where = f"train {model}" if model else self.prog.replace("pyro-lvm ", "")
            message = (
                f"{flag} does not apply to {where}; `pyro-lvm {where} --help` lists its flags"
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
    m._model = name
    groups = {}
    for flags, options, group in _TRAIN_FLAGS:
        dest = _dest(flags, options)
        if allowed is not None and dest not in allowed:
            continue
        if group not in groups:
            groups[group] = m.add_argument_group(group)
        groups[group].add_argument(*flags, **options)


def _given(args) -> dict:
    """The train flags the user passed, as TrainConfig fields (``--accelerator`` becomes
    ``--device``: gpu means cuda)."""
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    accelerator = getattr(args, "accelerator", None)
    if accelerator is not None:
        device = "cuda" if accelerator == "gpu" else "cpu"
        if given.get("device", device).split(":")[0] != device:
            raise RunError(
                f"--accelerator {accelerator} contradicts --device {given['device']}; pass one"
            )
        given["device"] = given.get("device", device)
    return given


def _config_from_args(args) -> TrainConfig:
    resume = getattr(args, "resume", None)
    if resume is not None:
        if getattr(args, "config", None) is not None:
            raise RunError("--config with --resume: a resumed run keeps its own config.json")
        return _resumed_config(args, Path(resume))
    fields = _config_file(args.config, args.model) if getattr(args, "config", None) else {}
    fields.update(_given(args))
    fields["model"] = args.model
    fields.setdefault("likelihood", DEFAULT_LIKELIHOOD.get(args.model, _DEFAULTS.likelihood))
    if getattr(args, "out", None) is not None or "out" not in fields:
        fields["out"] = getattr(args, "out", None) or (
            f"runs/{args.model}-{fields.get('dataset', _DEFAULTS.dataset)}"
        )
    return TrainConfig(**fields)


def _config_file(path: str, model: str) -> dict:
    """Settings from a JSON file (a run's ``config.json``): unknown keys and settings that
    do not apply to ``model`` (other than at their defaults) are one-line errors."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"--config {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"--config {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunError(f"--config {path} must hold a JSON object of settings")
    known = TrainConfig.__dataclass_fields__
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RunError(f"--config {path} has unknown settings: {', '.join(unknown)}")
    if data.get("model", model) != model:
        raise RunError(f"--config {path} is for model {data['model']!r}, not {model!r}")
    allowed = model_flags(model)
    fields = {}
    for key, value in data.items():
        if key == "model":
            continue
        if allowed is not None and key not in allowed and key != "out":
            if value != getattr(_DEFAULTS, key):
                raise RunError(
                    f"--config {path}: {key}={value!r} does not apply to {model}; remove it"
                )
            continue
        fields[key] = value
    return fields


def _resumed_config(args, run: Path) -> TrainConfig:
    """The run's recorded settings, with the flags a resume may change applied; any other
    flag (or an edit of config.json) that differs from the checkpoint is refused."""
    if not (run / "config.json").is_file() or not (
        (run / CHECKPOINT_NAME).is_file() or (run / PREVIOUS_NAME).is_file()
    ):
        raise RunError(
            f"--resume {run} is not a pyro-lvm run (needs config.json and "
            f"{CHECKPOINT_NAME}); pass the --out folder of an earlier run"
        )
    config = read_config(run)
    if config.model != args.model:
        raise RunError(f"--resume {run} is a {config.model!r} run, not {args.model!r}")
    recorded = load_checkpoint(run / CHECKPOINT_NAME).get("metadata", {}).get("config")
    if recorded is not None:  # config.json may have been edited since the checkpoint
        for key, value in recorded.items():
            if key in RESUMABLE or key == "out" or not hasattr(config, key):
                continue
            if getattr(config, key) != value:
                raise RunError(
                    f"{run}/config.json says {key}={getattr(config, key)!r} but the checkpoint "
                    f"was trained with {value!r}; restore config.json (a resumed run can "
                    f"only change {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)})"
                )
    out = getattr(args, "out", None)
    if out is not None and Path(out).resolve() != run.resolve():
        raise RunError(
            f"--out {out} with --resume {run}: a resumed run continues in its own folder; "
            "drop --out (or copy the run folder first)"
        )
    for key, value in _given(args).items():
        if key in RESUMABLE:
            setattr(config, key, value)
        elif getattr(config, key) != value:
            flag = "--" + key.replace("_", "-")
            raise RunError(
                f"{flag} {value} differs from the resumed run's {getattr(config, key)!r}: "
                "model, data and architecture are fixed for a run; start a new run with "
                f"another --out (a resume may change "
                f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)})"
            )
    config.out = str(run)
    return config


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = str(message).strip().splitlines()[0] if str(message).strip() else ""
    return f"pyro-lvm: warning: {text}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if len(argv) > 1 and argv[0] == "train":
        parser._model = argv[1]  # for the "does not apply to train MODEL" message
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and one-line usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    warnings.formatwarning = _one_line_warning
    try:
        threads = getattr(args, "threads", None)
        dataset = getattr(args, "dataset", _DEFAULTS.dataset)
        trains = args.command in ("train", "compare")
        if threads is None and (not trains or dataset == "digits"):
            # 8x8 inputs: threading overhead exceeds the arithmetic; evaluation (AIS, IWAE)
            # of any run is also faster single-threaded at these sizes (measured: issue 8)
            threads = 1 if trains else _run_threads(args.run_dir)
        if threads is not None:
            if threads <= 0:
                raise RunError(f"--threads must be positive, got {threads}")
            torch.set_num_threads(threads)
        if args.command == "train":
            config = _config_from_args(args)
            metrics = run_train(
                config,
                resume=getattr(args, "resume", None) is not None,
                progress=not getattr(args, "no_progress", False),
                figures=not getattr(args, "no_figures", False),
                overwrite=getattr(args, "overwrite", False),
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
    except (RunError, ValueError, FileNotFoundError, DivergenceError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        print(f"pyro-lvm: error: {message}", file=sys.stderr)
        return 2
    return 0


def _run_threads(run_dir: str) -> int | None:
    """One thread for a digits run's evaluation, torch's default otherwise."""
    try:
        dataset = json.loads((Path(run_dir) / "config.json").read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        return None
    return 1 if dataset == "digits" else None


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

    fields = _given(args)
    fields.setdefault("likelihood", _DEFAULTS.likelihood)
    settings = TrainConfig(**fields)
    settings.validate()

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
