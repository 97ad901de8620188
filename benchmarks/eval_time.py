"""Evaluation time at MNIST size: IWAE with K = 1000 and AIS with the CLI's defaults.

A 784-256-16 Bernoulli VAE (untrained: the cost does not depend on the weights) on random
binary images, one torch thread; prints thread CPU and wall seconds and the linear
extrapolation to 10,000 test images (the cost is linear in images, particles, steps and
chains).

    python benchmarks/eval_time.py [--iwae-images 1000] [--ais-images 100]
"""

from __future__ import annotations

import argparse
import time

import torch

from pyro_lvm.infer.ais import ais_log_likelihood
from pyro_lvm.infer.importance import iwae_log_likelihood
from pyro_lvm.models import VAE


def _timed(fn) -> tuple[float, float]:
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - cpu, time.perf_counter() - wall


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iwae-images", type=int, default=1000)
    parser.add_argument("--ais-images", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--ais-steps", type=int, default=1000)
    parser.add_argument("--ais-chains", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = VAE(784, 16, hidden_dim=256)
    x = torch.rand(max(args.iwae_images, args.ais_images), 784).round()
    results = {}
    cases = {
        f"IWAE K={args.num_samples}": (
            args.iwae_images,
            lambda: iwae_log_likelihood(
                vae.model, vae.guide, x[: args.iwae_images], num_samples=args.num_samples
            ),
        ),
        f"AIS {args.ais_steps} steps x {args.ais_chains} chains": (
            args.ais_images,
            lambda: ais_log_likelihood(
                vae.model,
                x[: args.ais_images],
                num_steps=args.ais_steps,
                num_chains=args.ais_chains,
            ),
        ),
    }
    for name, (images, fn) in cases.items():
        cpu, wall = _timed(fn)
        per_10k = cpu * 10_000 / images / 60
        results[name] = {"images": images, "cpu_s": cpu, "wall_s": wall, "cpu_min_10k": per_10k}
        print(
            f"{name}, {images} images: CPU {cpu:.1f} s, wall {wall:.1f} s; "
            f"10,000 images: {per_10k:.1f} CPU-minutes"
        )
    return results


if __name__ == "__main__":
    main()
