r"""Compare models under one protocol: ``pyro-lvm compare``.

Every model is trained with the same settings (networks, data, epochs, batch size,
learning rate, likelihood) for every seed, in its own run folder ``OUT/MODEL-seedS``, and
evaluated the same way on the test split:

- ``test_nelbo_per_dim``: minus the ELBO with each model's own proposal (the LAE paper's
  table metric);
- ``test_nll`` (and ``_per_dim``): the importance-weighted bound with that proposal;
- ``test_nll_ais`` (and ``_per_dim``) with ``eval_ais > 0``: annealed importance sampling,
  which judges the *decoder* whatever trained it, so it is the number to compare across
  inference algorithms (a poor proposal inflates ``test_nll`` but not AIS);
- ``sample_frechet``: Frechet distance between classifier features of ``num_test`` model
  samples and of the test images (:mod:`pyro_lvm.metrics`; not FID, and only comparable
  within one dataset and classifier);
- ``ms_per_step``: training time per optimizer step.

Resumable: a folder whose ``config.json`` matches the requested settings and whose
``metrics.json`` holds a finite ``test_nll`` evaluated with the requested evaluation
settings is reused without retraining; with other evaluation settings, a failed (``null``)
or a damaged evaluation it is re-evaluated from its checkpoint; a folder with a
checkpoint but no metrics is resumed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch

from pyro_lvm.data import DataBundle, load_dataset
from pyro_lvm.data.bundle import prepare_for_likelihood
from pyro_lvm.experiments.build import RunError
from pyro_lvm.experiments.checkpoint import CHECKPOINT_NAME
from pyro_lvm.experiments.compare_figure import plot_comparison
from pyro_lvm.experiments.config import TrainConfig, read_json_object
from pyro_lvm.experiments.lifecycle import run_evaluate, run_train
from pyro_lvm.experiments.rundir import write_json

__all__ = [
    "COMPARE_KEYS",
    "DEFAULT_MODELS",
    "CompareEvent",
    "compare",
    "summarize",
    "write_markdown",
]

DEFAULT_MODELS = ("vae", "vae-flow", "dlgm", "lae")

#: the columns of ``compare.md``, in order (absent keys are skipped)
COMPARE_KEYS = (
    "test_nelbo_per_dim",
    "test_nll",
    "test_nll_fixed",
    "test_nll_ais",
    "test_nll_ais_per_dim",
    "sample_frechet",
    "ms_per_step",
)

#: settings that change only the evaluation: a run differing in these is re-evaluated
_EVALUATION = ("eval_samples", "eval_ais", "device")


class CompareEvent(NamedTuple):
    """What :func:`compare` reports to its ``callback``.

    Attributes
    ----------
    kind : str
        ``"train"`` (training starts), ``"resume"`` (an interrupted run continues),
        ``"reuse"`` (a finished run is kept), ``"evaluate"`` (re-evaluation only),
        ``"done"`` (the run's metrics are final).
    model, seed : str, int
    index, total : int
        Position of this run among all ``len(models) * len(seeds)`` runs (1-based).
    run_dir : Path
    metrics : dict or None
        The run's metrics (``"done"`` only).
    """

    kind: str
    model: str
    seed: int
    index: int
    total: int
    run_dir: Path
    metrics: dict | None = None


def compare(
    models: Sequence[str],
    seeds: Sequence[int],
    settings: TrainConfig,
    out: str | Path,
    *,
    model_settings: Mapping[str, Mapping[str, Any]] | None = None,
    sample_quality: bool = True,
    progress: bool = False,
    callback: Callable[[CompareEvent], None] | None = None,
) -> list[dict]:
    """Train and evaluate every ``model`` for every ``seed`` with ``settings``.

    Parameters
    ----------
    models : sequence of str
        Registered model names (``pyro-lvm train --help``).
    seeds : sequence of int
    settings : TrainConfig
        The shared settings; ``model``, ``seed`` and ``out`` are set per run.
    out : path
        Comparison folder: runs in ``OUT/MODEL-seedS``, plus ``compare.json``,
        ``compare.md``, ``compare.png`` and the cached feature classifier.
    model_settings : mapping, optional
        ``{model: {field: value}}``: settings of one model only (e.g. LAE's
        ``num_steps``), recorded in its runs' ``config.json``; use sparingly, the
        point of a comparison is the shared budget.
    sample_quality : bool
        Measure ``sample_frechet`` (labelled datasets only).
    progress : bool
        Per-step progress bars of each training run (the CLI's).
    callback : callable, optional
        Called with a :class:`CompareEvent` before and after each run.

    Returns
    -------
    list of dict
        One metrics dict per run (with ``model`` and ``seed``), as in ``compare.json``.
    """
    models, seeds = list(models), list(seeds)
    _check(models, seeds, model_settings or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(settings.dataset, settings.data_dir, settings.download)
    # sample quality needs labels for its feature classifier
    judge = None
    if sample_quality and data.train_y is not None:
        judge = _SampleJudge(data, settings.likelihood, out)
    notify = callback or (lambda event: None)
    total, results = len(models) * len(seeds), []
    for index, (model, seed) in enumerate(((m, s) for m in models for s in seeds), 1):
        own = dict((model_settings or {}).get(model, {}))
        config = dataclasses.replace(
            settings, **own, model=model, seed=seed, out=str(out / f"{model}-seed{seed}")
        )
        run_dir = Path(config.out)

        def report(kind, model=model, seed=seed, index=index, run_dir=run_dir):
            notify(CompareEvent(kind, model, seed, index, total, run_dir))

        metrics = _run_one(config, data, progress, report)
        if judge is not None and "sample_frechet" not in metrics:
            metrics["sample_frechet"] = judge(config.out, seed)
            write_json(Path(config.out) / "metrics.json", metrics)
        results.append(metrics)
        notify(CompareEvent("done", model, seed, index, total, Path(config.out), metrics))
        write_json(out / "compare.json", results)  # partial results survive an interrupt
    write_markdown(out / "compare.md", results, settings)
    plot_comparison(results, summarize(results, COMPARE_KEYS), out / "compare.png")
    return results


def _check(models: list[str], seeds: list[int], model_settings: Mapping) -> None:
    from pyro_lvm.experiments.recipes import RECIPES

    if not models or not seeds:
        raise RunError("compare needs at least one model (--models) and one seed (--seeds)")
    unknown = [m for m in models if m not in RECIPES or m == "custom"]
    if unknown:
        choices = ", ".join(sorted(set(RECIPES) - {"custom"}))
        raise RunError(f"unknown model {unknown[0]!r} for compare; choose from {choices}")
    fields = set(TrainConfig.__dataclass_fields__) - {"model", "seed", "out"}
    for model, own in model_settings.items():
        bad = sorted(set(own) - fields)
        if model not in models or bad:
            what = f"unknown settings {', '.join(bad)}" if bad else "a model not compared"
            raise RunError(f"model_settings for {model!r}: {what}")
    for values, what in ((models, "model"), (seeds, "seed")):
        if len(set(values)) != len(values):
            raise RunError(f"a {what} is listed twice in --{what}s; list each once")


def _training_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in (*_EVALUATION, "out")}


def _run_one(config: TrainConfig, data: DataBundle, progress: bool, notify) -> dict:
    """Train, resume, re-evaluate or reuse the run in ``config.out``; its metrics.

    Reused only when its ``metrics.json`` holds a finite ``test_nll`` evaluated with the
    requested settings (the metrics record ``eval_samples`` and ``eval_ais``: a
    ``pyro-lvm evaluate`` since training may have changed them); otherwise re-evaluated
    from its checkpoint, whose failure is a one-line error.
    """
    run = Path(config.out)
    metrics_path, config_path = run / "metrics.json", run / "config.json"
    if config_path.is_file():
        recorded = read_json_object(config_path, "run config")
        wanted = _training_settings(config.to_dict())
        if _training_settings(recorded) != wanted:
            diff = sorted(k for k in wanted if recorded.get(k) != wanted[k])
            raise RunError(
                f"{run} holds a run with other settings ({', '.join(diff)}); compare into "
                "another --out, or delete that folder to retrain it"
            )
        metrics = _read_metrics(metrics_path)
        if metrics is not None and _finished(metrics) and _evaluated_as(metrics, recorded, config):
            notify("reuse")
            return metrics
        if (run / CHECKPOINT_NAME).is_file():
            if metrics is not None:  # evaluated otherwise, failed, or damaged: once more
                notify("evaluate")
                return run_evaluate(str(run), config.eval_samples, config.eval_ais, config.device)
            notify("resume")
            return run_train(config, resume=True, progress=progress, figures=False, data=data)
    notify("train")
    # a folder with config.json but neither metrics nor checkpoint died in its first epoch
    overwrite = config_path.is_file()
    return run_train(config, progress=progress, figures=False, data=data, overwrite=overwrite)


def _read_metrics(path: Path) -> dict | None:
    """``metrics.json``: ``None`` when absent, ``{}`` when damaged (not a JSON object)."""
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _finished(metrics: dict) -> bool:
    """Whether the run's evaluation succeeded (a failed one records ``null``)."""
    value = metrics.get("test_nll")
    return isinstance(value, (int, float)) and math.isfinite(value)


def _evaluated_as(metrics: dict, recorded: dict, config: TrainConfig) -> bool:
    """Whether ``metrics`` were evaluated with ``config``'s evaluation settings."""
    return (
        metrics.get("eval_samples") == config.eval_samples
        and metrics.get("eval_ais", recorded.get("eval_ais")) == config.eval_ais
        and recorded.get("device") == config.device
        and ("test_nll_ais" in metrics) == (config.eval_ais > 0)
    )


class _SampleJudge:
    """``sample_frechet`` of a run folder against the test split (one classifier)."""

    def __init__(self, data: DataBundle, likelihood: str, cache_dir: Path):
        from pyro_lvm.metrics import feature_classifier

        # the representation the models generate in (likelihood means, not binarized)
        train_x = prepare_for_likelihood(data.train_x, likelihood)
        self.reference = prepare_for_likelihood(data.test_x, likelihood)
        self.classifier = feature_classifier(
            train_x, data.train_y, cache_dir, f"{data.name}-{likelihood}"
        )

    def __call__(self, run_dir: str, seed: int) -> float:
        from pyro_lvm.experiments.runs import load_run
        from pyro_lvm.metrics import sample_frechet_distance

        model = load_run(run_dir).model
        with torch.random.fork_rng():
            pyro.set_rng_seed(seed)
            return sample_frechet_distance(model, self.reference, self.classifier)


def summarize(results: list[dict], keys: Sequence[str] = COMPARE_KEYS) -> dict:
    """``{model: {key: (mean, std, n)}}`` over seeds (sample std; 0 for one seed)."""
    table: dict[str, dict] = {}
    for row in results:
        table.setdefault(row["model"], {})
    for model in table:
        runs = [r for r in results if r["model"] == model]
        for key in keys:
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            values = [v for v in values if math.isfinite(v)]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                table[model][key] = (statistics.mean(values), sd, len(values))
    return table


def write_markdown(path: str | Path, results: list[dict], settings: TrainConfig) -> None:
    """``compare.md``: mean +- std over seeds per model, and the shared settings."""
    table = summarize(results)
    keys = [k for k in COMPARE_KEYS if any(k in row for row in table.values())]
    seeds = sorted({r["seed"] for r in results})
    lines = [
        f"# pyro-lvm compare: {settings.dataset}, {settings.likelihood} likelihood",
        "",
        f"mean +- std over seeds {seeds}; per test datapoint in nats unless per_dim; "
        "sample_frechet is a Frechet distance in a pyro_lvm-trained classifier's features "
        "(not FID).",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for model, row in table.items():
        cells = [_cell(row.get(k)) for k in keys]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    shared = {
        k: v
        for k, v in settings.to_dict().items()
        if k in ("epochs", "batch_size", "latent_dim", "hidden_dim", "depth", "arch", "lr")
        or k in ("layer_norm", "orthogonal_init", "eval_samples", "eval_ais")
    }
    lines += ["", "settings: " + ", ".join(f"{k}={v}" for k, v in shared.items()), ""]
    Path(path).write_text("\n".join(lines))


def _cell(stat) -> str:
    if stat is None:
        return "-"
    mean, sd, _ = stat
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f} +- {sd:.{digits}f}"
