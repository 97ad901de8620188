"""Experiment tracking: one small interface over Lightning's logger classes.

A run always writes ``OUT/logs/metrics.csv`` (one row per logged step, one column per
metric); ``--logger`` adds one tracker:

- ``csv``: nothing more (the default; no dependency);
- ``tensorboard``: :class:`lightning.pytorch.loggers.TensorBoardLogger` under
  ``OUT/tensorboard`` (``pip install pyro-lvm[tensorboard]``);
- ``mlflow``: :class:`lightning.pytorch.loggers.MLFlowLogger`, tracking to
  ``$MLFLOW_TRACKING_URI`` or else to a local store in the run folder
  (``sqlite:///OUT/mlflow.db``, artifacts in ``OUT/mlartifacts``;
  ``pip install pyro-lvm[mlflow]``);
- ``wandb``: :class:`lightning.pytorch.loggers.WandbLogger`, project ``pyro-lvm`` (or
  ``$WANDB_PROJECT``), files under ``OUT``; ``WANDB_MODE=offline`` keeps it local
  (``pip install pyro-lvm[wandb]``).

The CSV log is ours, not Lightning's ``CSVLogger``: that one deletes the previous
``metrics.csv`` of a folder it reopens, and a resumed run must continue its log. On
``--resume`` the rows after the checkpoint's step are dropped (the resumed run logs them
again), and MLflow and W&B continue the same tracked run (its id is kept in
``OUT/logs/tracker.json``).

What is logged: each epoch's training record (``train/loss``, ``train/accept_rate``...,
``validation/loss``; ``history.json``'s ``train_loss``, ``accept_rate``, ``val_loss``)
at step = epoch; at the end the finite test metrics
(``test/test_nll``...), the hyperparameters (the run's config) and the PNG figures.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["LOGGERS", "CSVLog", "RunLogger", "TrackerLog", "check_logger", "open_logger"]

#: the ``--logger`` choices
LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")
_EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def _finite(metrics: Mapping[str, object]) -> dict[str, float]:
    """The finite float values (counts such as ``num_train`` are settings, not metrics)."""
    return {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}


def _epoch_key(key: str) -> str:
    if key == "val_loss":
        return "validation/loss"
    return "train/" + key.removeprefix("train_")


class CSVLog:
    """``metrics.csv`` in a folder: a ``step`` column and one column per metric key,
    rewritten whole (atomically) at every flush, so new keys widen the header."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        self.path = Path(folder) / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if float(r["step"]) <= resume_step]
            self.rows = [{k: float(v) for k, v in r.items() if v != ""} for r in kept]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.rows.append({"step": step, **metrics})
        self.flush()

    def flush(self) -> None:
        keys = sorted({k for row in self.rows for k in row} - {"step"})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *keys])
            writer.writeheader()
            for row in self.rows:
                writer.writerow({**row, "step": int(row["step"])})
        os.replace(tmp, self.path)


class TrackerLog:
    """A Lightning logger (TensorBoard, MLflow or W&B) behind the same three calls."""

    def __init__(self, kind: str, logger):
        self.kind, self.logger = kind, logger

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.logger.log_metrics(dict(metrics), step=step)

    def log_hyperparams(self, params: Mapping[str, object], metrics: Mapping[str, float]):
        if self.kind == "tensorboard":  # the hparams plugin pairs them with the results
            self.logger.log_hyperparams(dict(params), dict(metrics))
            return
        if self.kind == "mlflow":
            # MLflow's parameters are immutable: a resumed run keeps the values it was
            # first logged with (config.json has the resumed settings)
            logged = self.logger.experiment.get_run(self.logger.run_id).data.params
            params = {k: v for k, v in params.items() if k not in logged}
        self.logger.log_hyperparams(dict(params))

    def log_figures(self, pngs: Iterable[Path], step: int) -> None:
        pngs = [Path(p) for p in pngs]
        if not pngs:
            return
        if self.kind == "tensorboard":
            import matplotlib.image

            for png in pngs:
                image = matplotlib.image.imread(png)[..., :3]
                self.logger.experiment.add_image(
                    f"figures/{png.stem}", image, step, dataformats="HWC"
                )
        elif self.kind == "mlflow":
            for png in pngs:
                self.logger.experiment.log_artifact(self.logger.run_id, str(png), "figures")
        else:
            self.logger.log_image("figures", [str(p) for p in pngs], step=step)

    def identity(self) -> str | None:
        """The tracked run's id, for a resumed run to continue it."""
        if self.kind == "mlflow":
            return self.logger.run_id
        if self.kind == "wandb":
            return self.logger.version
        return None

    def close(self, status: str) -> None:
        self.logger.finalize(status)


class RunLogger:
    """What the run lifecycle logs to: the CSV log and the optional tracker.

    Parameters
    ----------
    folder : Path
        The run folder.
    kind : str
        One of :data:`LOGGERS`.
    run_name : str
        The tracked run's display name.
    resume_step : int or None
        On ``--resume``, the checkpoint's step (later CSV rows are dropped, and the
        tracker continues the run it logged to).
    """

    def __init__(self, folder: Path, kind: str, run_name: str, resume_step: int | None = None):
        check_logger(kind)
        self.folder = Path(folder)
        self.csv = CSVLog(self.folder / "logs", resume_step)
        identity = self._identity(kind) if resume_step is not None else None
        self.tracker = None if kind == "csv" else _tracker(kind, self.folder, run_name, identity)
        if self.tracker is not None and self.tracker.identity() is not None:
            (self.folder / "logs").mkdir(parents=True, exist_ok=True)
            record = {"logger": kind, "id": self.tracker.identity()}
            (self.folder / "logs" / "tracker.json").write_text(json.dumps(record))

    def _identity(self, kind: str) -> str | None:
        """The id of the run this folder's tracker of ``kind`` logged to."""
        path = self.folder / "logs" / "tracker.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        return record.get("id") if record.get("logger") == kind else None

    def log_epoch(self, record: Mapping[str, object]) -> None:
        """One epoch's training record (``history.json``'s), at step = epoch."""
        metrics = {_epoch_key(k): v for k, v in _finite(record).items() if k != "epoch"}
        self.log_metrics(metrics, int(record["epoch"]))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        metrics = _finite(metrics)
        self.csv.log_metrics(metrics, step)
        self._track("log_metrics", metrics, step)

    def _track(self, method: str, *args) -> None:
        """Call the tracker; a tracker that fails (a server down, a full disk) is dropped
        with a warning, since the run's results are in its folder anyway."""
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as err:  # any tracker error: the run itself is fine
            kind, self.tracker = self.tracker.kind, None
            message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            warnings.warn(
                f"--logger {kind} stopped logging ({type(err).__name__}: {message}); the "
                f"run's results are in {self.folder} (metrics.json, logs/metrics.csv)",
                stacklevel=3,
            )

    def log_results(
        self, config: Mapping[str, object], metrics: Mapping[str, object], pngs, step: int
    ) -> None:
        """The end of a run: test metrics, hyperparameters, figures."""
        tests = {f"test/{k}": v for k, v in _finite(metrics).items()}
        self.log_metrics(tests, step)
        if self.tracker is None:
            return
        params = {
            k: v
            for k, v in config.items()
            if isinstance(v, (int, float, str, bool)) and k not in ("out", "data_dir")
        }
        results = {f"hparam/{k}": v for k, v in _finite(metrics).items() if k.startswith("test_")}
        self._track("log_hyperparams", params, results)
        self._track("log_figures", pngs, step)

    def close(self, status: str = "success") -> None:
        self._track("close", status)
        self.tracker = None


def check_logger(kind: str) -> None:
    """One-line ``ValueError`` for an unknown ``--logger`` or a tracker whose package is
    not installed (checked before a run writes anything)."""
    if kind not in LOGGERS:
        raise ValueError(f"--logger must be one of {', '.join(LOGGERS)}, got {kind!r}")
    if kind == "csv":
        return
    for package in ("lightning", kind):
        if importlib.util.find_spec(package) is None:
            raise ValueError(
                f"--logger {kind} needs the {package} package; pip install "
                f"pyro-lvm[{_EXTRA[kind]}]"
            )


def open_logger(
    folder: Path, kind: str = "csv", run_name: str = "run", resume_step: int | None = None
) -> RunLogger:
    """A :class:`RunLogger` for a run folder (one-line ``ValueError`` naming the extra to
    install when the tracker's package is missing)."""
    return RunLogger(folder, kind, run_name, resume_step)


def _tracker(kind: str, folder: Path, run_name: str, identity: str | None) -> TrackerLog:
    from lightning.pytorch import loggers

    if kind == "tensorboard":
        logger = loggers.TensorBoardLogger(
            save_dir=str(folder), name="tensorboard", version="", default_hp_metric=False
        )
    elif kind == "mlflow":
        logger = _mlflow(loggers.MLFlowLogger, folder, run_name, identity)
    else:
        logger = loggers.WandbLogger(
            name=run_name,
            project=os.environ.get("WANDB_PROJECT", "pyro-lvm"),
            save_dir=str(folder),
            id=identity,
            resume="allow" if identity else None,
        )
    return TrackerLog(kind, logger)


def _mlflow(cls, folder: Path, run_name: str, run_id: str | None):
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    local = uri is None
    if local:  # a local store in the run folder (MLflow 3 retired the plain file store)
        uri = f"sqlite:///{folder.resolve() / 'mlflow.db'}"
    with warnings.catch_warnings():
        # MLflow's SQL store imports with SQLAlchemy >= 2.1's deprecation of the `noload`
        # loader strategy, which MLflow (not this library) uses
        warnings.filterwarnings(
            "ignore",
            message="The ``noload`` loader strategy is deprecated",
            category=DeprecationWarning,
        )
        logger = cls(
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "pyro-lvm"),
            run_name=run_name,
            tracking_uri=uri,
            run_id=run_id,
            artifact_location=str(folder.resolve() / "mlartifacts") if local else None,
        )
        _ = logger.run_id  # creates the experiment and the run now, under the filter
    return logger
