"""Where the LAE step's time goes: pyro_lvm's phases against the hand-written floor's.

One LAE step (digits size, 64-256-8 MLP, batch 100, T = 2, MH, ``jit_compile=True``) and
the floor's (:class:`floors.LAEStep`), interleaved step by step, each phase timed with
thread CPU time by wrappers around binding the batch (``kernel.bind`` and
``ald.ald_init``: "prepare"), ``ald.ald_transition`` ("transitions"), the optimizer's
step, ``Tensor.backward`` and ``torch.autograd.grad`` (the wrappers add a little to
pyro_lvm's side; the floor's phases are timed inline). Prints microseconds per step
(``other``: the total less prepare, transitions, the final backward and the optimizer
step; ``autograd.grad`` is inside prepare and the transitions) and writes
``benchmarks/results/lae_phases.json``::

    python benchmarks/lae_phases.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import pathlib
import sys
import time

import torch

from pyro_lvm.infer import LAE
from pyro_lvm.infer.mcmc import ald, amortized_langevin
from pyro_lvm.models import LangevinAutoencoder

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import floors  # noqa: E402

TIMES: collections.defaultdict[str, float] = collections.defaultdict(float)
WHO = ["pyro_lvm"]


def timed(name: str, fn, *, per_variant: bool = False):
    def wrapper(*args, **kwargs):
        start = time.thread_time_ns()
        out = fn(*args, **kwargs)
        TIMES[f"{WHO[0]} {name}" if per_variant else name] += time.thread_time_ns() - start
        return out

    return wrapper


def floor_step(step: floors.LAEStep, x: torch.Tensor) -> float:
    """:meth:`floors.LAEStep.__call__` with its phases timed."""
    step.optim.zero_grad(set_to_none=True)
    t0 = time.thread_time_ns()
    features, state = step.prepare(x)
    t1 = time.thread_time_ns()
    w, potentials = step.transitions(features, x, state)
    TIMES["torch prepare"] += t1 - t0
    TIMES["torch transitions"] += time.thread_time_ns() - t1
    return step.finish(w, potentials)


def main(steps: int) -> dict[str, float]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((100, 64), 0.3))
    base = LangevinAutoencoder(64, 8, hidden_dim=256)
    lvm, ref = copy.deepcopy(base), copy.deepcopy(base)
    optim = torch.optim.Adam(lvm.parameters(), lr=1e-3)
    lae = LAE(lvm.model, lvm.encoder, optim, num_steps=2, jit_compile=True)
    chain = ref.encoder[-1].weight
    ref_optim = torch.optim.Adam([p for p in ref.parameters() if p is not chain], lr=1e-3)
    floor = floors.LAEStep(ref.encoder, ref.decoder, ref_optim, num_steps=2)

    kernel = amortized_langevin.AmortizedLangevin
    originals = (kernel.bind, ald.ald_init, ald.ald_transition)
    originals += (torch.Tensor.backward, torch.autograd.grad)
    kernel.bind = timed("pyro_lvm prepare", kernel.bind)
    ald.ald_init = timed("pyro_lvm prepare", ald.ald_init)
    ald.ald_transition = timed("pyro_lvm transitions", ald.ald_transition)
    torch.Tensor.backward = timed("Tensor.backward", torch.Tensor.backward, per_variant=True)
    torch.autograd.grad = timed("autograd.grad", torch.autograd.grad, per_variant=True)
    for optimizer, who in ((optim, "pyro_lvm"), (ref_optim, "torch")):
        optimizer.step = timed(f"{who} optimizer step", optimizer.step)

    def run(who: str) -> None:
        WHO[0] = who
        start = time.thread_time_ns()
        lae.step(x) if who == "pyro_lvm" else floor_step(floor, x)
        TIMES[f"{who} TOTAL"] += time.thread_time_ns() - start

    try:
        for _ in range(20):
            run("pyro_lvm"), run("torch")
        TIMES.clear()
        for i in range(steps):  # interleaved, the order alternating
            for who in ("pyro_lvm", "torch") if i % 2 else ("torch", "pyro_lvm"):
                run(who)
    finally:
        kernel.bind, ald.ald_init, ald.ald_transition = originals[:3]
        torch.Tensor.backward, torch.autograd.grad = originals[3:]
    rows = {k: TIMES[k] / steps / 1e3 for k in sorted(TIMES)}
    for who in ("pyro_lvm", "torch"):  # zero_grad, diagnostics, the driver's bookkeeping
        parts = ("prepare", "transitions", "Tensor.backward", "optimizer step")
        rows[f"{who} other"] = rows[f"{who} TOTAL"] - sum(rows[f"{who} {p}"] for p in parts)
    return dict(sorted(rows.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    rows = main(args.steps)
    for name, us in rows.items():
        print(f"{name:34s} {us:8.1f} us")
    out = pathlib.Path(__file__).parent / "results" / "lae_phases.json"
    out.write_text(json.dumps({"steps": args.steps, "us_per_step": rows}, indent=1) + "\n")
