"""Run folders: never overwritten, never mixed, never half-written.

A run folder holds what :func:`pyro_lvm.experiments.lifecycle.run_train` writes: ``config.json``,
``checkpoint.pt`` (and the previous one, ``checkpoint.prev.pt``), ``metrics.json``,
``history.json``, figures and TensorBoard logs. The rules, enforced here:

* a folder that already holds a run is only trained into with ``resume`` (continue it) or
  ``overwrite`` (delete the run's files first); otherwise a one-line :class:`RunDirError`
  and nothing in the folder changes;
* one writer at a time: :class:`RunLock` holds an exclusive ``flock`` on ``OUT/.lock`` for
  the whole run (released by the kernel if the process dies, so a crash never leaves a
  stale lock);
* JSON is written atomically (temporary file + ``os.replace``) and strictly: non-finite
  numbers become ``null``, never the invalid ``NaN`` token.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "RUN_MARKERS",
    "RunDirError",
    "RunLock",
    "check_run_dir",
    "check_writable",
    "clear_run",
    "holds_run",
    "non_finite_keys",
    "prepare_run_dir",
    "write_json",
]

#: files whose presence means "this folder holds a run"
RUN_MARKERS = ("config.json", "checkpoint.pt", "checkpoint.prev.pt", "metrics.json")
_RUN_FILES = (*RUN_MARKERS, "history.json")
#: besides the figures: the draws of ``pyro-lvm sample`` (sample_nNUM_seedSEED.pt/.png)
_RUN_GLOBS = ("*.png", "sample_n*_seed*.pt", "*.tmp")
LOCK_NAME = ".lock"


class RunDirError(ValueError):
    """A run folder that cannot be used as asked (one line, with the fix)."""


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` is a folder with any file of a training run."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def check_writable(path: Path, what: str) -> None:
    """One-line :class:`RunDirError` unless ``path`` (a folder) can be written."""
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"{what} {path} is not writable; pass a folder you can write to")


def check_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Check, writing nothing, that ``out`` may receive a run.

    Raises :class:`RunDirError` if ``out`` is a file, cannot be created or written, or
    already holds a run while neither ``resume`` nor ``overwrite`` is set.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder; pass a folder path")
    if holds_run(out) and not (resume or overwrite):
        raise RunDirError(
            f"{out} already holds a run; pass --resume {out} to continue it, --overwrite to "
            "replace it, or another --out"
        )
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise RunDirError(
            f"cannot create run folder {out}: {parent} is a file; pass another --out"
        )
    check_writable(parent, "run folder" if parent == out else "parent folder")
    return out


def prepare_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """:func:`check_run_dir`, then create the folder."""
    out = check_run_dir(out, resume, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(
            f"cannot create run folder {out} ({err.strerror}); pass another --out"
        ) from None
    return out


def clear_run(out: str | Path) -> None:
    """Delete the files a training run writes in ``out`` (for ``--overwrite``); other
    files are left alone."""
    out = Path(out)
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for pattern in _RUN_GLOBS:
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


class RunLock:
    """Exclusive lock on a run folder for one writer (``with RunLock(out): ...``).

    Uses ``fcntl.flock`` where available (POSIX): the kernel drops the lock when the
    process exits, however it exits. Elsewhere the lock file's exclusive creation is the
    lock (a crashed run then leaves ``.lock`` behind, which the error message names).
    """

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None
        if fcntl is None:  # pragma: no cover
            try:
                self._fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise self._busy() from None
        else:
            self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self._fd)
                self._fd = None
                raise self._busy() from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())
        return self

    def _busy(self) -> RunDirError:
        try:
            pid = self.path.read_text().strip() or "?"
        except OSError:
            pid = "?"
        return RunDirError(
            f"{self.path.parent} is in use by another pyro-lvm process (pid {pid}); wait for "
            f"it to finish or pass another --out (a stale lock: delete {self.path})"
        )

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: no window for a stale file
            os.close(self._fd)
            self._fd = None


def _strict(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _strict(obj.item())
    return obj


def non_finite_keys(metrics: dict) -> list[str]:
    """The keys of ``metrics`` whose float values are NaN or infinite."""
    return [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]


def write_json(path: str | Path, obj: Any) -> None:
    """Write strict JSON atomically (non-finite floats become ``null``)."""
    path = Path(path)
    text = json.dumps(_strict(obj), indent=2, sort_keys=True, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
