"""Export a trained run as ``model.safetensors`` + ``config.json``: weights without pickles.

A run folder's checkpoint is a ``torch.save`` zip (loaded with ``weights_only=True``,
but still a pickle format, and it carries optimizer and sampler state). An export holds
only what the trained model needs, in formats that run no code when read:

- ``model.safetensors``: every tensor of the run's modules (``modules.<state_dict key>``)
  and the Pyro params the model keeps outside its modules (``params.<name>``, their
  unconstrained values), written by :mod:`safetensors`;
- ``config.json``: the run's settings (the same keys as a run folder's ``config.json``)
  plus an ``export`` entry: the format version, the data shape the model was built for,
  each Pyro param's constraint (as a checkpoint records it,
  :mod:`~pyro_lvm.experiments.params`: a name, or a class of ``torch.distributions`` /
  ``pyro.distributions`` and plain attributes) and the run's ``metrics.json``.

:func:`pyro_lvm.load_run` loads an export folder as it loads a run folder (the model,
its settings and metrics; no history, and a fresh optimizer: training continues from the
run folder, not from an export).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pyro import get_param_store
from torch import nn

from pyro_lvm.experiments.checkpoint import CHECKPOINT_NAME
from pyro_lvm.experiments.params import load_param_store_state, param_store_state

__all__ = [
    "EXPORT_FORMAT",
    "is_export",
    "load_params",
    "read_export",
    "write_export",
]

#: the version of the export layout (``config.json["export"]["format"]``)
EXPORT_FORMAT = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` holds an export (weights and config, no checkpoint)."""
    folder = Path(folder)
    return (folder / WEIGHTS_NAME).is_file() and not (folder / CHECKPOINT_NAME).is_file()


@contextmanager
def own_param_store():
    """An empty Pyro param store for the block; the caller's is put back after."""
    store = get_param_store()
    saved = store.get_state()
    store.clear()
    try:
        yield store
    finally:
        store.clear()
        store.set_state(saved)


def write_export(
    modules: nn.Module,
    config: dict[str, Any],
    data: dict[str, Any],
    out: str | Path,
    metrics: dict[str, Any] | None = None,
) -> None:
    """Write the tensors of ``modules`` and the Pyro params outside them (from Pyro's
    param store, as :func:`~pyro_lvm.experiments.params.param_store_state` finds them)
    with their constraints, and ``config`` with the export entry."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"modules.{k}": v.detach().cpu().clone().contiguous()
        for k, v in modules.state_dict().items()
    }
    params = {}
    for name, entry in param_store_state(modules).items():
        tensors[f"params.{name}"] = entry["value"].cpu().contiguous()
        params[name] = {"constraint": _plain(entry["constraint"], name)}
    entry = {"format": EXPORT_FORMAT, "data": data, "params": params, "metrics": metrics or {}}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pyro-lvm"})
    (out / CONFIG_NAME).write_text(json.dumps({**config, "export": entry}, indent=2))


def read_export(folder: str | Path, device: str = "cpu") -> tuple[dict, dict, dict]:
    """``(config.json dict, module tensors, params)`` of an export folder; ``params``
    maps each Pyro param name to ``{"value": unconstrained tensor, "constraint": ...}``
    (the checkpoint's form, for :func:`load_params`).

    Raises
    ------
    ValueError
        One line: ``config.json`` is not an export's or names an unknown format.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        entry = config["export"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"{folder}/{CONFIG_NAME} is not a pyro-lvm export's config; export the run again "
            "(pyro-lvm export RUN_DIR OUT)"
        ) from None
    if entry.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{folder} is export format {entry.get('format')!r}; this pyro-lvm reads "
            f"format {EXPORT_FORMAT}: export the run again with this version"
        )
    tensors = load_file(str(folder / WEIGHTS_NAME), device=device)
    modules = {
        k.removeprefix("modules."): v for k, v in tensors.items() if k.startswith("modules.")
    }
    params = {
        name: {"value": tensors[f"params.{name}"], "constraint": spec["constraint"]}
        for name, spec in entry.get("params", {}).items()
    }
    return config, modules, params


def load_params(params: dict[str, dict[str, Any]], device: torch.device | str = "cpu") -> None:
    """Put exported params into Pyro's param store (their exact unconstrained values)."""
    load_param_store_state(params, torch.device(device))


def _plain(encoded: Any, param: str) -> Any:
    """A checkpoint's constraint record as JSON: 0-d tensors become numbers; a larger
    tensor (bounds per element) cannot be written into ``config.json``."""
    if isinstance(encoded, dict):
        return {k: _plain(v, param) for k, v in encoded.items()}
    if isinstance(encoded, torch.Tensor):
        if encoded.dim() != 0:
            raise ValueError(
                f"pyro.param {param!r}: its constraint holds a tensor of shape "
                f"{tuple(encoded.shape)}, which an export cannot record; use scalar bounds"
            )
        return encoded.item()
    return encoded
