"""AIS with one decoder backward per annealing step against a previous revision's AIS.

Loads ``pyro_lvm/infer/ais.py`` as it was at ``--rev`` (default ``0eb41b7``, the last
revision that differentiated the decoder twice per step) next to the current one, runs
both on the same VAE and batch, interleaved step by step (see :mod:`harness`), and
compares the estimates drawn with the same seeds: the same random numbers, so they agree
up to float rounding, unless a rounding difference flips an accept decision (in float32
that happens now and then and moves a datapoint's estimate by up to a few tenths of a
nat; in float64 the two agree to about 1e-12).

    python benchmarks/ais_backward.py [--rev 0eb41b7] [--size mnist] [--steps 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from harness import interleave, load_average  # noqa: E402
from run_all import SIZES  # noqa: E402

from pyro_lvm.infer import ais_log_likelihood  # noqa: E402
from pyro_lvm.models import VAE  # noqa: E402


def load_revision(rev: str) -> types.ModuleType:
    root = Path(__file__).parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:pyro_lvm/infer/ais.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(f"ais_{rev}")
    exec(compile(source, f"ais@{rev}", "exec"), module.__dict__)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", default="0eb41b7")
    parser.add_argument("--size", choices=list(SIZES), default="mnist")
    parser.add_argument("--steps", type=int, default=100, help="annealing steps")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    old = load_revision(args.rev)
    d, h, z, b = SIZES[args.size]
    torch.manual_seed(0)
    vae = VAE(d, z, hidden_dim=h)
    x = torch.bernoulli(torch.full((b, d), 0.3))
    options = dict(num_steps=args.steps, num_chains=args.chains)

    def max_diff(model, x, seeds) -> torch.Tensor:
        diffs = []
        for seed in seeds:
            torch.manual_seed(seed)
            a = old.ais_log_likelihood(model, x, **options)
            torch.manual_seed(seed)
            diffs.append((ais_log_likelihood(model, x, **options) - a).abs())
        return torch.stack(diffs)

    diffs = max_diff(vae.model, x, range(args.repeats))
    # in float64 no rounding difference flips an accept decision: agreement to ~1e-12
    vae64 = copy.deepcopy(vae).double()
    diffs64 = max_diff(vae64.model, x.double(), range(2))

    def timed(fn):
        return lambda: fn(vae.model, x, **options).sum().item()

    load = load_average()
    timing = interleave(
        {"old (two backwards)": timed(old.ais_log_likelihood), "new": timed(ais_log_likelihood)},
        baseline="old (two backwards)",
        steps=2,
        repeats=args.repeats,
        warmup=1,
    )
    result = {
        "rev": args.rev,
        "size": args.size,
        **options,
        "batch": b,
        "load_average_before": load,
        "load_average_after": load_average(),
        "max_abs_diff_nats": float(diffs.max()),
        "median_abs_diff_nats": float(diffs.median()),
        "max_abs_diff_nats_float64": float(diffs64.max()),
        **timing,
    }
    ratio = timing["ratios"]["new"]["cpu"]
    print(
        f"AIS {args.size}, {args.steps} steps x {args.chains} chains, batch {b}: new/old CPU "
        f"time {ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}]; estimates "
        f"differ by at most {result['max_abs_diff_nats']:.2e} nats (median "
        f"{result['median_abs_diff_nats']:.2e}; float64: at most "
        f"{result['max_abs_diff_nats_float64']:.1e}); load {load:.2f}"
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"ais_backward_{args.size}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
