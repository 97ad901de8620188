"""Load a trained run in Python: :func:`load_run`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pyro_lvm.experiments.build import build_experiment
from pyro_lvm.experiments.checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    load_checkpoint,
    preserved_rng,
)
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes.base import Experiment
from pyro_lvm.experiments.trainer import Trainer

__all__ = ["Run", "load_run"]


@dataclass
class Run:
    """A trained run, loaded by :func:`load_run`.

    Attributes
    ----------
    model : nn.Module
        The trained model (``model.model(x)``, ``model.guide(x)``, ``model.generate(n)``
        for the ready models), in eval mode.
    config : TrainConfig
        The run's settings.
    metrics : dict
        ``metrics.json`` (empty if the run was never evaluated).
    history : dict
        ``history.json``: ``{"epochs": [...], "steps": [...]}`` training logs.
    experiment : Experiment
        Model, inference driver (optimizer and sampler state restored) and modules.
    data_dim : int
        Input dimension the model was built for.
    image_shape : tuple or None
        Shape of one datapoint as an image, when the data are images.
    """

    model: nn.Module
    config: TrainConfig
    metrics: dict
    history: dict
    experiment: Experiment
    data_dim: int
    image_shape: tuple[int, ...] | None = None
    trainer: Any = field(default=None, repr=False)


def load_run(
    run_dir: str | Path,
    device: str | None = "cpu",
    checkpoint: str = CHECKPOINT_NAME,
    model_file: str | None = None,
) -> Run:
    """Load the run in ``run_dir`` without touching its dataset.

    The caller's process is left as it was (random generators, Pyro's validation
    setting), except that Pyro params the model keeps outside its modules
    (``pyro.param``) are put into Pyro's param store, where the model reads them.

    Parameters
    ----------
    run_dir : path
        The ``--out`` folder of ``pyro-lvm train``.
    device : str, optional
        Where to put the model (a CUDA-trained run loads on CPU by default); ``None``:
        the device the run was trained on.
    checkpoint : str
        ``checkpoint.pt`` (the last epoch) or ``best.pt`` (the best monitored loss).
    model_file : str, optional
        For a ``custom`` run: the ``PATH.py:NAME`` to import. Never read from the run's
        ``config.json``, since importing runs code: you name the code you trust.

    Examples
    --------
    >>> run = load_run("runs/vae-digits")  # doctest: +SKIP
    >>> x = run.model.generate(16)  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (
        (run_dir / CHECKPOINT_NAME).is_file() or (run_dir / PREVIOUS_NAME).is_file()
    ):
        raise FileNotFoundError(
            f"{run_dir} is not a pyro-lvm run (needs config.json and {CHECKPOINT_NAME}); pass "
            "the --out folder of a training run"
        )
    config = TrainConfig.load(run_dir / "config.json")
    if device is not None:
        config.device = device
    if config.model == "custom":
        if model_file is None:
            raise ValueError(
                f"{run_dir} is a custom-model run ({config.model_file}); pass model_file= "
                "(--model-file) to import that code: loading never runs code on its own"
            )
        config.model_file = model_file
    try:
        config.validate()
    except ValueError as err:
        raise ValueError(f"{run_dir}/config.json: {err}; restore the file") from None
    ckpt_path = run_dir / checkpoint
    meta = load_checkpoint(ckpt_path).get("metadata", {})
    metrics = _read_json(run_dir / "metrics.json")
    data_info = meta.get("data") or {"data_dim": metrics.get("data_dim")}
    if data_info.get("data_dim") is None:
        raise ValueError(f"{run_dir}: neither the checkpoint nor metrics.json records data_dim")
    # building draws initial weights from the global generators and restoring would set
    # them to the checkpoint's: the caller's streams are put back (the weights are the
    # checkpoint's either way)
    with preserved_rng():
        experiment = build_experiment(config, int(data_info["data_dim"]))
        trainer = Trainer(experiment, None, config.batch_size, device=config.device)
        trainer.restore(ckpt_path, set_rng=False)
    experiment.lvm.eval()
    shape = data_info.get("image_shape")
    return Run(
        model=experiment.lvm,
        config=config,
        metrics=metrics,
        history=_read_json(run_dir / "history.json") or {"epochs": [], "steps": []},
        experiment=experiment,
        data_dim=int(data_info["data_dim"]),
        image_shape=tuple(shape) if shape else None,
        trainer=trainer,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
