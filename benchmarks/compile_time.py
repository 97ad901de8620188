"""What compiling costs and what it saves: the numbers behind the CLI's ``jit_compile`` default.

For the CLI's VAE and LAE (``pyro-lvm train vae|lae`` networks, one torch thread) at
digits and MNIST sizes, and each backend (``eager``, ``fx``: the captured graphs replayed,
``inductor``: compiled kernels), a fresh process times

* ``first``: the seconds the first training step, a short last batch and one evaluation
  (``evaluate_loss``, no gradient) take: capture and compile of the three signatures a
  training run meets;
* ``ms/step``: the median thread time of a training step afterwards.

Each backend runs twice in its own process with an empty Inductor cache directory, then
again with that directory filled (``cached``: Inductor's on-disk cache of compiled
kernels, what every later run on the machine gets). The break-even number of steps,
``(first - first_eager) / (ms/step_eager - ms/step)``, says when compiling pays for itself.
Writes ``results/compile_time.json``::

    python benchmarks/compile_time.py [--sizes digits mnist] [--models vae lae]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"digits": (64, 256, 8, 100), "mnist": (784, 256, 16, 100)}


def _child(model: str, size: str, backend: str) -> dict:
    """One fresh process: first steps (capture, compile) and the step time after."""
    import pyro
    import torch

    from pyro_lvm.experiments.build import build_experiment
    from pyro_lvm.experiments.config import TrainConfig

    torch.set_num_threads(1)
    d, h, z, b = SIZES[size]
    jit = {"eager": False, "fx": "fx", "inductor": "inductor"}[backend]
    config = TrainConfig(model=model, hidden_dim=h, latent_dim=z, batch_size=b, jit_compile=jit)
    inference = build_experiment(config, d).inference
    pyro.set_rng_seed(0)
    x = torch.bernoulli(torch.full((b, d), 0.3))
    last = x[: b // 3]
    start = time.perf_counter()
    inference.step(x)
    inference.step(last)
    with torch.no_grad():
        inference.evaluate_loss(x)
    first = time.perf_counter() - start
    times = []
    for _ in range(40):
        t0 = time.thread_time()
        inference.step(x)
        times.append(1000 * (time.thread_time() - t0))
    return {"first_s": first, "ms_per_step": statistics.median(times[5:])}


def _run(model: str, size: str, backend: str, cache: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    out = subprocess.run(
        [sys.executable, __file__, "--child", model, size, backend],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["digits", "mnist"], choices=SIZES)
    parser.add_argument("--models", nargs="+", default=["vae", "lae"], choices=["vae", "lae"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return {}
    rows = []
    for size in args.sizes:
        for model in args.models:
            row = {"model": model, "size": size}
            for backend in ("eager", "fx", "inductor"):
                with tempfile.TemporaryDirectory() as cache:
                    cold = _run(model, size, backend, cache)
                    warm = _run(model, size, backend, cache)
                row[backend] = {"cold": cold, "cached": warm}
            rows.append(row)
            print(_line(row), flush=True)
    result = {"rows": rows, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_time.json").write_text(json.dumps(result, indent=2))
    return result


def _line(row: dict) -> str:
    eager = row["eager"]["cached"]
    parts = [f"{row['model']} {row['size']}: eager {eager['ms_per_step']:.2f} ms/step"]
    for backend in ("fx", "inductor"):
        cold, warm = row[backend]["cold"], row[backend]["cached"]
        saving = eager["ms_per_step"] - warm["ms_per_step"]
        extra = [c["first_s"] - eager["first_s"] for c in (cold, warm)]
        even = [f"{1000 * e / saving:.0f}" if saving > 0 else "never" for e in extra]
        parts.append(
            f"{backend} {warm['ms_per_step']:.2f} ms/step, first {cold['first_s']:.1f} s "
            f"(cached {warm['first_s']:.1f} s), pays off after {even[0]} ({even[1]}) steps"
        )
    return "; ".join(parts)


if __name__ == "__main__":
    main()
