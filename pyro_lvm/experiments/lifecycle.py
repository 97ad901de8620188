"""The run lifecycle: build, train, evaluate and sample a run folder.

What ``pyro-lvm train / evaluate / sample`` do, callable from Python (the CLI only parses
flags into a :class:`~pyro_lvm.experiments.config.TrainConfig` and calls these). Every
failure a user can fix is a one-line :class:`RunError`.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path

import pyro

from pyro_lvm.data import DataBundle, load_dataset
from pyro_lvm.experiments.build import RunError, check_device, setup_run
from pyro_lvm.experiments.checkpoint import (
    CHECKPOINT_NAME,
    atomic_save,
    preserved_rng,
    set_rng_state,
)
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.evaluation import evaluate
from pyro_lvm.experiments.fabric import agree_or_raise, check_data_parallel, launch
from pyro_lvm.experiments.protocol import GenerativeModel, PlottableModel, missing
from pyro_lvm.experiments.recipes import Experiment
from pyro_lvm.experiments.rundir import (
    RunLock,
    check_run_dir,
    check_writable,
    clear_run,
    non_finite_keys,
    prepare_run_dir,
    write_json,
)
from pyro_lvm.experiments.runs import load_run
from pyro_lvm.experiments.schedules import make_schedulers, set_learning_rate
from pyro_lvm.experiments.trainer import Trainer
from pyro_lvm.infer.diagnostics import DivergenceError
from pyro_lvm.models.likelihoods import LIKELIHOODS

__all__ = ["run_evaluate", "run_sample", "run_train", "sample_paths"]


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
    overwrite: bool = False,
) -> dict:
    """Train, evaluate and write ``metrics.json`` (+ figures); returns the metrics.

    The run folder ``config.out`` must not hold a run unless ``resume`` (continue it) or
    ``overwrite`` (replace it) is set; it is locked against a second writer while this
    runs. Raises :class:`RunError` (one line) for every failure the user can fix,
    including non-finite results (``metrics.json`` then records them as ``null``).

    Training owns the process's random state: it seeds the global generators from
    ``config.seed`` (and leaves them where the run ends). Pyro's argument validation is
    off while it runs (the data are checked once up front) and restored afterwards.
    """
    # every check before anything is written: flags, folder, data, model
    config.validate()
    check_device(config.device)
    collective = launch(config)  # --devices/--num-nodes: one process per device (Fabric)
    with pyro.validation_enabled(False):
        return _train(config, collective, resume, progress, figures, data, overwrite)


def _train(config, collective, resume, progress, figures, data, overwrite) -> dict:
    out = Path(config.out)
    # data parallel: rank 0 alone checks the folder (the others would race its writes)
    agree_or_raise(
        collective, lambda: check_run_dir(out, resume=resume, overwrite=overwrite), lead_only=True
    )
    experiment, data = setup_run(config, data)
    val_x = None
    if config.validation:
        data, val_x = data.holdout(config.validation, seed=config.seed)
    if collective is not None:
        agree_or_raise(collective, lambda: check_data_parallel(experiment, config, data))
    trainer = Trainer(
        experiment,
        data,
        config.batch_size,
        out,
        config.seed,
        config.device,
        validation_x=val_x,
        early_stopping=config.early_stopping,
        schedulers=make_schedulers(
            experiment.inference,
            config.lr_schedule,
            config.epochs,
            config.lr_step,
            config.lr_gamma,
        ),
        collective=collective,
    )
    trainer.metadata = {"config": config.to_dict(), "data": _data_info(data)}
    if not trainer.is_writer:  # data parallel: the same steps, nothing written
        return _train_follower(config, experiment, data, trainer, out, resume)
    prepare_run_dir(out, resume=resume, overwrite=overwrite)
    with RunLock(out):
        if not (resume or overwrite):
            check_run_dir(out)  # another process may have finished a run here meanwhile
        if overwrite and not resume:
            clear_run(out)
        return _train_locked(config, experiment, data, trainer, out, resume, progress, figures)


def _train_follower(config, experiment, data, trainer, out, resume) -> dict:
    """A data-parallel rank other than 0: what :func:`_train_locked` does, in the same
    order (every collective is matched), without writing, logging or printing."""
    if resume:
        trainer.restore(out / CHECKPOINT_NAME)
        set_learning_rate(experiment.inference, config.lr)
    if experiment.prepare is not None and trainer.state.step == 0:
        experiment.prepare(data.train_x.to(config.device))
    trainer.fit(config.epochs)
    if experiment.finalize is not None:
        experiment.finalize(data.train_x.to(config.device))
    return _metrics(config, experiment, data, trainer)


def _train_locked(config, experiment, data, trainer, out, resume, progress, figures) -> dict:
    if resume:
        trainer.restore(out / CHECKPOINT_NAME)
        if trainer.state.epoch > config.epochs:
            raise RunError(
                f"{out} has already trained {trainer.state.epoch} epochs; --epochs must be at "
                f"least {trainer.state.epoch}"
            )
        set_learning_rate(experiment.inference, config.lr)
    write_json(out / "config.json", config.to_dict())
    if experiment.prepare is not None and trainer.state.step == 0:
        experiment.prepare(data.train_x.to(config.device))
    writer = _tensorboard(out)
    bar = _progress_bar(config, data, trainer, enabled=progress)

    def on_step(state, loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix({"loss": f"{loss:.2f}", **_short(experiment.inference.metrics())})

    def on_epoch(state, record):
        if writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, float) and math.isfinite(value):
                    tag = "validation/loss" if key == "val_loss" else f"train/{key}"
                    writer.add_scalar(tag, value, record["epoch"])

    previous = signal.getsignal(signal.SIGINT)

    def request_stop(signum, frame):
        trainer.stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    try:
        trainer.fit(config.epochs, on_step=on_step, on_epoch=on_epoch)
    except KeyboardInterrupt:
        raise RunError(
            f"interrupted at epoch {trainer.state.epoch + 1}, step {trainer.state.step}; "
            f"checkpoint saved, continue with --resume {out}"
        ) from None
    except DivergenceError as err:
        raise RunError(f"{err} (at step {trainer.state.step + 1}; {_kept(out)})") from None
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
    if experiment.finalize is not None:  # post-training fits, e.g. ae-gmm's mixture prior
        experiment.finalize(data.train_x.to(config.device))
        trainer.save()  # evaluate/sample must see the fitted state
    elif not (out / CHECKPOINT_NAME).is_file():
        trainer.save()  # --epochs 0: the initial (or prepared) model, so the run loads
    metrics = _metrics(config, experiment, data, trainer)
    write_json(
        out / "history.json", {"epochs": trainer.state.history, "steps": trainer.state.steps}
    )
    pngs = []
    try:
        _write_metrics(out, metrics)
        if figures and _plottable(experiment, "training figures"):
            from pyro_lvm.experiments.figures import figure_title, write_figures

            title = figure_title(config.model, data.name, trainer.state.epoch)
            pngs = write_figures(experiment, data, trainer.state, out, title) or []
    finally:
        if writer is not None:
            _log_run(writer, config, metrics, pngs)
    return metrics


def _log_run(writer, config: TrainConfig, metrics: dict, pngs: list) -> None:
    """TensorBoard: test metrics as scalars and hparams, the figures as images."""
    finite = {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
    for key, value in finite.items():
        writer.add_scalar(f"test/{key}", value, config.epochs)
    hparams = {
        k: v
        for k, v in config.to_dict().items()
        if isinstance(v, (int, float, str, bool)) and k not in ("out", "data_dir")
    }
    tests = {f"hparam/{k}": v for k, v in finite.items() if k.startswith("test_")}
    if tests:
        writer.add_hparams(hparams, tests, run_name="hparams")
    import matplotlib.image

    for png in pngs:
        writer.add_image(
            f"figures/{Path(png).stem}",
            matplotlib.image.imread(png)[..., :3],
            config.epochs,
            dataformats="HWC",
        )
    writer.close()


def _plottable(experiment: Experiment, what: str) -> bool:
    """The figures need :class:`~pyro_lvm.experiments.protocol.PlottableModel` (the ready
    models' protocol); a custom model without it gets its metrics and a notice instead."""
    lacking = missing(experiment.lvm, PlottableModel)
    if lacking:
        warnings.warn(
            f"{what} skipped: the model has no {' or '.join(lacking)} "
            "(pyro_lvm.experiments.protocol.PlottableModel; see docs/cli.md, custom models)",
            stacklevel=2,
        )
    return not lacking


def _data_info(data: DataBundle) -> dict:
    """What :func:`pyro_lvm.load_run` needs to rebuild the model without the dataset."""
    return {
        "name": data.name,
        "data_dim": data.data_dim,
        "image_shape": list(data.image_shape) if data.image_shape is not None else None,
    }


def _kept(out: Path) -> str:
    if (out / CHECKPOINT_NAME).is_file():
        return f"the last good checkpoint is kept in {out}; continue with --resume {out}"
    return "no checkpoint was written (it diverged in the first epoch)"


def _write_metrics(out: Path, metrics: dict) -> None:
    """Strict JSON; non-finite results are recorded as null and are an error."""
    write_json(out / "metrics.json", metrics)
    bad = non_finite_keys(metrics)
    if bad:
        raise RunError(
            f"non-finite results ({', '.join(bad)}; null in {out / 'metrics.json'}): the "
            "model diverged or the settings are impossible; lower --lr or check the flags"
        )


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
    with trainer.rank_stream(tag=-(1 << 20)):  # data parallel: test rows sharded, gathered
        metrics.update(
            evaluate(
                experiment,
                data.test_x,
                eval_samples=config.eval_samples,
                eval_ais=config.eval_ais,
                device=config.device,
            )
        )
    metrics["eval_ais"] = config.eval_ais  # what was evaluated (config.json: what was trained)
    metrics["eval_seconds"] = time.perf_counter() - t0
    metrics["warnings"] = [w["kind"] for w in trainer.state.warnings]
    metrics["best_epoch"] = trainer.state.best_epoch
    metrics["stopped_early"] = trainer.state.stopped_early
    if trainer.validation_x is not None:
        metrics["num_validation"] = int(trainer.validation_x.shape[0])
        if trainer.state.history:
            metrics["val_loss"] = trainer.state.history[-1].get("val_loss", float("nan"))
    return metrics


def _load_run(run_dir: str, device: str | None = None, model_file: str | None = None):
    run = load_run(run_dir, device=device, model_file=model_file)  # None: the run's device
    config = run.config
    data = load_dataset(config.dataset, config.data_dir, config.download).for_likelihood(
        LIKELIHOODS[config.likelihood]
    )
    if data.data_dim != run.data_dim:
        raise RunError(
            f"{run_dir} was trained on {run.data_dim}-dimensional data but {config.dataset} in "
            f"{config.data_dir} has {data.data_dim}; point --data-dir at the run's data"
        )
    return config, run.experiment, data, run.trainer


def run_evaluate(
    run_dir: str,
    eval_samples: int = 1000,
    eval_ais: int = 0,
    device: str | None = None,
    model_file: str | None = None,
) -> dict:
    """Re-evaluate a run; updates and returns its ``metrics.json``.

    The estimators draw from the random state saved with the checkpoint, so the same
    settings reproduce the training run's own numbers; the caller's generators and Pyro's
    validation setting are left as they were.
    """
    run = Path(run_dir)
    if run.is_dir():  # fail before the (long) evaluation, not after it
        check_writable(run, "run folder")
    with pyro.validation_enabled(False), preserved_rng():
        config, experiment, data, trainer = _load_run(run_dir, device, model_file)
        config.eval_samples, config.eval_ais = eval_samples, eval_ais
        config.validate()
        with RunLock(run):
            metrics = _read_metrics(run / "metrics.json")
            set_rng_state(trainer.saved_rng)
            fresh = _metrics(config, experiment, data, trainer)
            for key in ("train_seconds", "ms_per_step"):  # keep the training run's timings
                fresh[key] = metrics.get(key, fresh[key])
            metrics.update(fresh)
            _write_metrics(run, metrics)
    return metrics


def _read_metrics(path: Path) -> dict:
    """A run's ``metrics.json``, or ``{}`` when it is missing or damaged (a re-evaluation
    replaces it)."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def sample_paths(run_dir: str | Path, num: int, seed: int) -> tuple[Path, Path]:
    """Where ``pyro-lvm sample`` writes: its own names, never the training figures."""
    stem = Path(run_dir) / f"sample_n{num}_seed{seed}"
    return stem.with_suffix(".pt"), stem.with_suffix(".png")


def run_sample(run_dir: str, num: int = 64, seed: int = 0, model_file: str | None = None) -> Path:
    """Draw ``num`` samples from a run: writes ``sample_nNUM_seedSEED.pt`` (and ``.png``
    for images) in the run folder, holding its lock; returns the ``.pt`` path. The
    caller's random generators are left as they were."""
    if num <= 0:
        raise RunError(f"--num must be positive, got {num}")
    if not 0 <= seed < 2**32:
        raise RunError(f"--seed must be between 0 and 2**32 - 1, got {seed}")
    run = Path(run_dir)
    if run.is_dir():
        check_writable(run, "run folder")
    with pyro.validation_enabled(False), preserved_rng():
        config, experiment, data, _ = _load_run(run_dir, model_file=model_file)
        if missing(experiment.lvm, GenerativeModel):
            raise RunError(
                f"the model of {run_dir} ({type(experiment.lvm).__name__}) has no generate(n), "
                "so it cannot be sampled; add a generate(n) method to it "
                "(pyro_lvm.experiments.protocol.GenerativeModel)"
            )
        with RunLock(run):
            pyro.set_rng_seed(seed)
            x = experiment.lvm.generate(num).cpu()
            pt, png = sample_paths(run, num, seed)
            atomic_save(x, pt)
            if data.image_shape is not None and _plottable(experiment, "the sample figure"):
                from pyro_lvm.experiments.figures import save_sample_grid

                save_sample_grid(x, data, experiment, png, f"{num} samples, seed {seed}")
    return pt
