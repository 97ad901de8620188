"""Timing harness for the benchmarks: interleaved variants, thread CPU time and spread.

Every benchmark compares *variants* of one computation (pyro_lvm against a hand-written
torch floor, or an old against a new implementation) that run in the same process on
identical networks and data. To make the comparison trustworthy on a shared machine:

* the variants are **interleaved step by step** (one step of each, in an order that
  rotates every step), so a change in machine load hits all of them alike;
* each step is timed with **thread CPU time** (:func:`time.thread_time`, immune to the
  process being descheduled) as well as wall time; torch runs on one thread, so the
  thread's CPU time is the whole cost of the step;
* a *repetition* is ``steps`` steps of every variant; per repetition we take each
  variant's mean step time and the ratio of means, and report the **median with
  [min, max] over repetitions**, so the spread is visible;
* the 1-minute **load average** is recorded before and after.

A ratio below 1 against a floor, or a [min, max] range that is wide, says the measurement
is not to be trusted (too few steps, or a loaded machine).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["Spread", "interleave", "load_average", "spread"]

Spread = dict[str, float]


def spread(values: list[float]) -> Spread:
    """``{"median", "min", "max"}`` of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def load_average() -> float:
    """The 1-minute load average (NaN where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return float("nan")


def interleave(
    variants: Mapping[str, Callable[[], object]],
    *,
    baseline: str,
    steps: int,
    repeats: int,
    warmup: int = 3,
) -> dict:
    """Time ``variants`` (name -> zero-argument step) interleaved step by step.

    Parameters
    ----------
    variants : mapping
        Each value runs one step of its variant (it must finish its work, e.g. return a
        Python float, so that nothing is left pending).
    baseline : str
        The variant the ratios divide by (the hand-written floor).
    steps, repeats : int
        Steps per variant per repetition, and repetitions.
    warmup : int
        Untimed steps of every variant first (allocator, autograd caches, step-size search).

    Returns
    -------
    dict
        ``{"variants": {name: {"cpu_ms": Spread, "wall_ms": Spread}},
        "ratios": {name: {"cpu": Spread, "wall": Spread}}}`` with ratios ``name / baseline``.
    """
    names = list(variants)
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {names}")
    for _ in range(warmup):
        for name in names:
            variants[name]()
    cpu = {n: [] for n in names}  # per repetition: mean ms per step
    wall = {n: [] for n in names}
    for _ in range(repeats):
        cpu_sum = dict.fromkeys(names, 0.0)
        wall_sum = dict.fromkeys(names, 0.0)
        for step in range(steps):
            k = step % len(names)
            for name in names[k:] + names[:k]:  # rotate: no variant always goes first
                fn = variants[name]
                c0, w0 = time.thread_time(), time.perf_counter()
                fn()
                w1, c1 = time.perf_counter(), time.thread_time()
                cpu_sum[name] += c1 - c0
                wall_sum[name] += w1 - w0
        for name in names:
            cpu[name].append(1000 * cpu_sum[name] / steps)
            wall[name].append(1000 * wall_sum[name] / steps)
    out = {
        "variants": {n: {"cpu_ms": spread(cpu[n]), "wall_ms": spread(wall[n])} for n in names},
        "ratios": {},
    }
    for name in names:
        if name == baseline:
            continue
        out["ratios"][name] = {
            "cpu": spread([a / b for a, b in zip(cpu[name], cpu[baseline])]),
            "wall": spread([a / b for a, b in zip(wall[name], wall[baseline])]),
        }
    return out
