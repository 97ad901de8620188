"""Per-step overhead of pyro_lvm's SVI VAE against a hand-written PyTorch VAE.

Same networks (``pyro_lvm.models.VAE``'s encoder and decoder modules), same batch, same
optimizer; the hand-written step computes the single-sample reparameterized ELBO with
torch.distributions directly. Reports the median over repeats of the mean step time, and
the ratio pyro_lvm / PyTorch (target <= 1.15 at batch 100 on CPU).

    python benchmarks/vae_overhead.py [--repeats 7] [--steps 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pyro
import torch
from torch.distributions import Bernoulli, Normal

from pyro_lvm.infer import ModuleSVI
from pyro_lvm.models import VAE


def torch_step(vae: VAE, optim, x):
    optim.zero_grad(set_to_none=True)
    loc, scale = vae.encoder(x)
    z = loc + scale * torch.randn_like(loc)
    logits = vae.decoder(z)
    log_px = Bernoulli(logits=logits, validate_args=False).log_prob(x).sum()
    log_pz = Normal(0.0, 1.0, validate_args=False).log_prob(z).sum()
    log_qz = Normal(loc, scale, validate_args=False).log_prob(z).sum()
    loss = -(log_px + log_pz - log_qz)
    loss.backward()
    optim.step()
    return loss.item()


def time_steps(step, steps: int) -> float:
    for _ in range(10):  # warm-up (allocator, autograd graph caches)
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - t0) / steps


def measure(data_dim, hidden_dim, latent_dim, batch, steps, repeats) -> dict:
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((batch, data_dim), 0.3))
    vae_a = VAE(data_dim, latent_dim, hidden_dim=hidden_dim)
    vae_b = VAE(data_dim, latent_dim, hidden_dim=hidden_dim)
    vae_b.load_state_dict(vae_a.state_dict())
    opt_a = torch.optim.Adam(vae_a.parameters(), 1e-3)
    opt_b = torch.optim.Adam(vae_b.parameters(), 1e-3)
    svi = ModuleSVI(vae_a.model, vae_a.guide, opt_a)
    pyro_ms, torch_ms = [], []
    for _ in range(repeats):  # interleave so drifts in machine load hit both alike
        pyro_ms.append(time_steps(lambda: svi.step(x), steps))
        torch_ms.append(time_steps(lambda: torch_step(vae_b, opt_b, x), steps))
    p, t = statistics.median(pyro_ms), statistics.median(torch_ms)
    return {
        "data_dim": data_dim,
        "hidden_dim": hidden_dim,
        "latent_dim": latent_dim,
        "batch": batch,
        "pyro_lvm_ms": p,
        "torch_ms": t,
        "ratio": p / t,
        "overhead_ms": p - t,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--validation", action="store_true", help="keep Pyro validation on")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "vae_overhead.json")
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validation)
    configs = [
        (64, 256, 8, 100),  # digits, the CLI default networks
        (784, 256, 8, 100),  # MNIST-sized
        (784, 1024, 8, 100),  # the LAE paper's width
        (784, 256, 8, 32),
        (784, 256, 8, 256),
    ]
    rows = [measure(*c, steps=args.steps, repeats=args.repeats) for c in configs]
    print(f"{'D':>5} {'H':>5} {'B':>4} {'pyro_lvm ms':>12} {'torch ms':>9} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['data_dim']:5d} {r['hidden_dim']:5d} {r['batch']:4d} {r['pyro_lvm_ms']:12.3f} "
            f"{r['torch_ms']:9.3f} {r['ratio']:6.3f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
