"""Checkpoints that survive crashes and never execute code when loaded.

Three guarantees, each tested in ``tests/test_bad_inputs.py`` and ``tests/test_checkpoint.py``:

* **Atomic**: a checkpoint is written to a temporary file in the same folder, flushed,
  ``fsync``-ed and moved into place with ``os.replace``; a crash (even ``kill -9``) while
  writing leaves the previous file intact.
* **Two slots**: before a new checkpoint replaces ``checkpoint.pt``, the old one becomes
  ``checkpoint.prev.pt``; a damaged newest file falls back to the one before with a
  one-line warning.
* **Safe loading**: files load with ``torch.load(..., weights_only=True)``, which rebuilds
  only tensors and plain containers (PyTorch's restricted unpickler); random-generator
  states are stored as tensors and plain numbers for that reason, so a planted checkpoint
  cannot run code.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "PREVIOUS_NAME",
    "CheckpointError",
    "atomic_save",
    "load_checkpoint",
    "preserved_rng",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
#: the checkpoint of the epoch with the best monitored loss (validation, else training)
BEST_NAME = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, truncated, garbage or unsafe)."""


def atomic_save(obj: Any, path: str | Path, keep_previous: bool = False) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``.

    With ``keep_previous`` the file being replaced is first moved to
    :data:`PREVIOUS_NAME` beside it (for the fallback in :func:`load_checkpoint`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            _copy_to_previous(path)
        os.replace(tmp, path)  # the one step that changes what checkpoint.pt holds
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_to_previous(path: Path) -> None:
    """Make the previous slot a copy of ``path`` without ever removing ``path`` (a hard
    link where the filesystem allows, else a copy), then move it into place atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=PREVIOUS_NAME, suffix=".tmp")
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, path.with_name(PREVIOUS_NAME))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_one(path: Path, map_location) -> dict:
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; cut short, it isn't
        raise CheckpointError(f"{path} is damaged or truncated (not a complete torch archive)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any global it does not know: a planted or foreign file
        found = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "global" in ln]
        detail = found[-1] if found else "it needs code to load"
        raise CheckpointError(f"{path} is not a safe pyro-lvm checkpoint ({detail})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        kind = type(err).__name__
        raise CheckpointError(f"{path} is damaged or truncated ({kind})") from None
    if not isinstance(obj, dict) or "modules" not in obj:
        raise CheckpointError(f"{path} is not a pyro-lvm checkpoint (no 'modules' entry)")
    return obj


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by the trainer; a damaged :data:`CHECKPOINT_NAME` falls
    back to the previous slot (the epoch before) with a one-line warning. Any other file
    (:data:`BEST_NAME`) has no fallback: the previous epoch is not the best one.

    Raises
    ------
    FileNotFoundError
        Neither ``path`` nor its previous slot exists.
    CheckpointError
        Every slot is unreadable (one line, naming the file).
    """
    path = Path(path)
    previous = path.with_name(PREVIOUS_NAME) if path.name == CHECKPOINT_NAME else None
    if not path.is_file() and (previous is None or not previous.is_file()):
        raise FileNotFoundError(
            f"no checkpoint at {path}: is this a pyro-lvm run directory? (it must contain "
            f"{CHECKPOINT_NAME} and config.json)"
        )
    try:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        return _load_one(path, map_location)
    except CheckpointError as err:
        if previous is None:
            raise CheckpointError(
                f"{err}; load {CHECKPOINT_NAME} (the last epoch) instead, or retrain"
            ) from None
        if not previous.is_file():
            raise CheckpointError(f"{err}; no previous checkpoint to fall back to") from None
        ckpt = _load_one(previous, map_location)
        warnings.warn(
            f"{err}; using the previous checkpoint {previous.name} (one epoch earlier)",
            stacklevel=2,
        )
        return ckpt


def rng_state() -> dict:
    """States of Python's, NumPy's and torch's (CPU and CUDA) generators, as plain data.

    NumPy's Mersenne Twister key becomes a tensor so the checkpoint loads with
    ``weights_only=True``.
    """
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npy["key"].cpu().numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["gauss"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block and put Python's, NumPy's and torch's (CPU and CUDA) generators back
    as they were: a library call that seeds or draws leaves the caller's streams alone."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
