"""GPU timings: a VAE step, an LAE step and IWAE evaluation with K = 1000 samples.

::

    python benchmarks/gpu.py                 # CUDA if present, else a message and exit 0
    python benchmarks/gpu.py --device cpu --quick   # the same code path on the CPU

Each case runs on MNIST-sized inputs (784 dimensions, batch 100, the ready recipes'
networks) after warm-up steps; the step time is measured with ``torch.cuda.synchronize``
around a block of steps (CUDA kernels are asynchronous, so timing single steps would
measure the launch queue). Prints a Markdown table and writes ``results/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_lvm.experiments.build import build_experiment  # noqa: E402
from pyro_lvm.experiments.config import TrainConfig  # noqa: E402
from pyro_lvm.infer.importance import log_importance_weights  # noqa: E402

DATA_DIM = 784
BATCH = 100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, steps: int) -> float:
    """Milliseconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return 1000.0 * (time.perf_counter() - t0) / steps


def _experiment(model: str, device: torch.device, hidden: int):
    config = TrainConfig(
        model=model, latent_dim=32, hidden_dim=hidden, batch_size=BATCH, device=str(device)
    )
    pyro.set_rng_seed(config.seed)  # as training does (build_experiment leaves it to us)
    return build_experiment(config, DATA_DIM)


def run(device: torch.device, quick: bool) -> list[dict]:
    """Time the three cases on ``device``; one row per case."""
    warmup, steps = (2, 3) if quick else (10, 50)
    hidden = 128 if quick else 512
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(BATCH, DATA_DIM, device=device, generator=gen).bernoulli(generator=gen)
    rows = []
    for model in ("vae", "lae"):
        experiment = _experiment(model, device, hidden)
        ms = _timed(lambda exp=experiment: exp.inference.step(x), device, warmup, steps)
        rows.append({"case": f"{model} step", "ms": ms, "batch": BATCH})
    experiment = _experiment("vae", device, hidden)
    lvm = experiment.lvm
    lvm.eval()
    num_samples = 100 if quick else 1000

    @torch.no_grad()
    def iwae():
        log_w = log_importance_weights(
            lvm.model, lvm.guide, x, num_samples=num_samples, max_plate_nesting=1, chunk_size=100
        )
        return log_w.logsumexp(0) - math.log(num_samples)

    ms = _timed(iwae, device, 1, 2 if quick else 10)
    rows.append({"case": f"iwae K={num_samples}", "ms": ms, "batch": BATCH})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="few steps, small networks")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: CUDA is not available; nothing to time (pass --device cpu)")
        return {"skipped": "no CUDA"}
    device = torch.device(args.device)
    with pyro.validation_enabled(False):  # as training runs (the data are checked once)
        rows = run(device, args.quick)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "quick": args.quick, "torch": torch.__version__, "rows": rows}
    print(f"| case ({name}) | ms |\n|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['ms']:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"gpu{suffix}_{device.type}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
