"""Training progress on stderr: a live bar on a terminal, plain lines in a pipe or a log.

tqdm redraws its bar with carriage returns, which a terminal overwrites in place but a
log file keeps: hundreds of updates on one line (``pyro-lvm train lae 2> log``). So the
bar is shown only when stderr is a terminal; otherwise :class:`EpochLines` prints one
line per epoch, at most one every ``min_interval`` seconds (the last epoch always), so a
long run of short epochs stays readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

__all__ = ["EpochLines", "LiveBar", "open_progress"]


def _short(metrics: Mapping[str, object]) -> dict[str, str]:
    return {k: f"{v:.3g}" for k, v in metrics.items() if isinstance(v, float)}


class LiveBar:
    """tqdm's bar, updated every step (a terminal)."""

    def __init__(self, total: int, initial: int, desc: str, stream: TextIO):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=stream)

    def step(self, loss: float, metrics: Mapping[str, object]) -> None:
        self.bar.update(1)
        self.bar.set_postfix({"loss": f"{loss:.2f}", **_short(metrics)})

    def epoch(self, record: Mapping[str, object]) -> None:
        pass  # the bar shows the steps

    def close(self) -> None:
        self.bar.close()


class EpochLines:
    """One line per epoch: ``DESC: epoch E/N, step S/T, train_loss ..., ..., Xs``."""

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        stream: TextIO,
        epochs: int,
        min_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.steps, self.desc, self.stream = total, initial, desc, stream
        self.epochs, self.min_interval, self.clock = epochs, min_interval, clock
        self.start = self.last = clock()
        self.printed = None  # the first epoch is always printed

    def step(self, loss: float, metrics: Mapping[str, object]) -> None:
        self.steps += 1

    def epoch(self, record: Mapping[str, object]) -> None:
        now, epoch = self.clock(), int(record["epoch"])
        final = epoch >= self.epochs
        if self.printed is not None and now - self.last < self.min_interval and not final:
            return
        shown = ", ".join(f"{k} {v}" for k, v in _short(record).items())
        self.stream.write(
            f"{self.desc}: epoch {epoch}/{self.epochs}, step {self.steps}/{self.total}"
            f"{', ' + shown if shown else ''}, {now - self.start:.1f}s\n"
        )
        self.stream.flush()
        self.last, self.printed = now, epoch

    def close(self) -> None:
        pass


def open_progress(
    total: int, initial: int, desc: str, epochs: int, stream: TextIO | None = None
) -> LiveBar | EpochLines:
    """A :class:`LiveBar` when ``stream`` (default: stderr) is a terminal, else
    :class:`EpochLines`."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return LiveBar(total, initial, desc, stream)
    return EpochLines(total, initial, desc, stream, epochs)
