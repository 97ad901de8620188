"""From the command line's flags to a run's :class:`~pyro_lvm.experiments.config.TrainConfig`.

The CLI (:mod:`pyro_lvm.cli`) parses; this module decides what the flags mean: the
settings of a ``--config`` file (checked by key, model and type), a resumed run's recorded
settings with the flags a resume may change, ``--accelerator`` as ``--device``, and the
defaults that depend on the model. Every refusal is a one-line
:class:`~pyro_lvm.experiments.build.RunError` naming the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyro_lvm.experiments.build import RunError
from pyro_lvm.experiments.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME, load_checkpoint
from pyro_lvm.experiments.config import TrainConfig, check_types, read_json_object
from pyro_lvm.experiments.recipes import model_flags

__all__ = [
    "DEFAULT_LIKELIHOOD",
    "RESUMABLE",
    "compare_config",
    "default_threads",
    "given_settings",
    "read_config_file",
    "resumed_config",
    "train_config",
]

#: the likelihood of a model when ``--likelihood`` is not given (else TrainConfig's)
DEFAULT_LIKELIHOOD = {"ppca": "gaussian"}

#: settings a resumed run may change (the rest define the run and must match it)
RESUMABLE = (
    "epochs",
    "lr",
    "eval_samples",
    "eval_ais",
    "device",
    "devices",
    "strategy",
    "num_nodes",
)
_DEFAULTS = TrainConfig()


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def default_threads(command: str, flags: Mapping[str, Any]) -> int | None:
    """Torch CPU threads for a command: ``--threads``, else one for the 8x8 ``digits``
    (threading overhead exceeds the arithmetic; evaluation by AIS and IWAE too), else
    ``None`` (torch's default)."""
    threads = flags.get("threads")
    if threads is not None:
        if threads <= 0:
            raise RunError(f"--threads must be positive, got {threads}")
        return threads
    if command in ("train", "compare"):
        return 1 if flags.get("dataset", _DEFAULTS.dataset) == "digits" else None
    try:
        dataset = read_json_object(Path(flags["run_dir"]) / "config.json", "run config")
    except (OSError, ValueError):
        return None  # the command itself reports the folder
    return 1 if dataset.get("dataset") == "digits" else None


def given_settings(flags: Mapping[str, Any]) -> dict:
    """The :class:`TrainConfig` fields among the flags the user gave (``accelerator``
    becomes ``device``: gpu means cuda)."""
    given = {k: v for k, v in flags.items() if k in TrainConfig.__dataclass_fields__}
    accelerator = flags.get("accelerator")
    if accelerator is not None:
        device = "cuda" if accelerator == "gpu" else "cpu"
        if given.get("device", device).split(":")[0] != device:
            raise RunError(
                f"--accelerator {accelerator} contradicts --device {given['device']}; pass one"
            )
        given["device"] = given.get("device", device)
    return given


def train_config(
    model: str,
    flags: Mapping[str, Any],
    *,
    config_file: str | None = None,
    resume: str | None = None,
) -> TrainConfig:
    """The settings of ``pyro-lvm train MODEL``: TrainConfig's defaults, then
    ``config_file``, then the ``flags`` given; or, with ``resume``, the resumed run's own
    settings with the flags a resume may change (:data:`RESUMABLE`). Not validated yet
    (:func:`~pyro_lvm.experiments.lifecycle.run_train` validates once)."""
    if resume is not None:
        if config_file is not None:
            raise RunError("--config with --resume: a resumed run keeps its own config.json")
        return resumed_config(model, flags, Path(resume))
    fields = read_config_file(config_file, model) if config_file is not None else {}
    fields.update(given_settings(flags))
    fields["model"] = model
    fields.setdefault("likelihood", DEFAULT_LIKELIHOOD.get(model, _DEFAULTS.likelihood))
    out = flags.get("out")
    if out is not None or "out" not in fields:
        fields["out"] = out or f"runs/{model}-{fields.get('dataset', _DEFAULTS.dataset)}"
    return TrainConfig(**fields)


def compare_config(flags: Mapping[str, Any]) -> TrainConfig:
    """The shared settings of ``pyro-lvm compare`` (validated)."""
    fields = given_settings(flags)
    fields.setdefault("likelihood", _DEFAULTS.likelihood)
    settings = TrainConfig(**fields)
    settings.validate()
    return settings


def read_config_file(path: str, model: str) -> dict:
    """Settings from a JSON file (a run's ``config.json``) for ``model``: unknown keys,
    values of the wrong type and settings that do not apply to ``model`` (other than at
    their defaults) are one-line errors naming the file."""
    where = f"--config {path}"
    try:
        data = read_json_object(path, "settings file")
    except FileNotFoundError:
        raise RunError(f"{where}: no such file") from None
    except ValueError as err:
        raise RunError(f"--config {err}") from None
    known = TrainConfig.__dataclass_fields__
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RunError(f"{where} has unknown settings: {', '.join(unknown)}")
    try:
        data = check_types(data, where)
    except ValueError as err:
        raise RunError(str(err)) from None
    if data.get("model", model) != model:
        raise RunError(f"{where} is for model {data['model']!r}, not {model!r}")
    allowed = model_flags(model)
    fields = {}
    for key, value in data.items():
        if key == "model":
            continue
        if allowed is not None and key not in allowed and key != "out":
            if value != getattr(_DEFAULTS, key):
                raise RunError(f"{where}: {key}={value!r} does not apply to {model}; remove it")
            continue
        fields[key] = value
    try:  # the file's own values, where it can be named
        TrainConfig(**{**fields, "model": model}).validate()
    except ValueError as err:
        raise RunError(f"{where}: {err}") from None
    return fields


def resumed_config(model: str, flags: Mapping[str, Any], run: Path) -> TrainConfig:
    """The run's recorded settings, with the flags a resume may change applied; any other
    flag (or an edit of config.json) that differs from the checkpoint is refused."""
    if not (run / "config.json").is_file() or not (
        (run / CHECKPOINT_NAME).is_file() or (run / PREVIOUS_NAME).is_file()
    ):
        raise RunError(
            f"--resume {run} is not a pyro-lvm run (needs config.json and "
            f"{CHECKPOINT_NAME}); pass the --out folder of an earlier run"
        )
    config = TrainConfig.load(run / "config.json")
    if config.model != model:
        raise RunError(f"--resume {run} is a {config.model!r} run, not {model!r}")
    resumable = ", ".join(_flag(k) for k in RESUMABLE)
    recorded = load_checkpoint(run / CHECKPOINT_NAME).get("metadata", {}).get("config")
    if recorded is not None:  # config.json may have been edited since the checkpoint
        for key, value in recorded.items():
            if key in RESUMABLE or key == "out" or not hasattr(config, key):
                continue
            if getattr(config, key) != value:
                raise RunError(
                    f"{run}/config.json says {key}={getattr(config, key)!r} but the checkpoint "
                    f"was trained with {value!r}; restore config.json (a resumed run can "
                    f"only change {resumable})"
                )
    out = flags.get("out")
    if out is not None and Path(out).resolve() != run.resolve():
        raise RunError(
            f"--out {out} with --resume {run}: a resumed run continues in its own folder; "
            "drop --out (or copy the run folder first)"
        )
    for key, value in given_settings(flags).items():
        if key == "out":
            continue
        if key in RESUMABLE:
            setattr(config, key, value)
        elif getattr(config, key) != value:
            raise RunError(
                f"{_flag(key)} {value} differs from the resumed run's {getattr(config, key)!r}: "
                "model, data and architecture are fixed for a run; start a new run with "
                f"another --out (a resume may change {resumable})"
            )
    config.out = str(run)
    return config
