"""Per-step overhead of pyro_lvm's SVI VAE against a hand-written PyTorch VAE.

Superseded by ``benchmarks/run_all.py``, whose ``vae`` case this runs: the two steps
interleaved step by step, thread CPU time and wall time, medians with [min, max] over
repetitions, Pyro validation on (the library's default) and off. The former version of
this script timed 100-step wall-clock blocks with no spread and validation off; its
numbers did not reproduce (two runs gave MNIST-size ratios 0.97 and 1.21).

    python benchmarks/vae_overhead.py [--quick] [--sizes digits mnist] [--threads 1]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import run_all  # noqa: E402


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_all.main(["--only", "vae", *argv])


if __name__ == "__main__":
    main()
