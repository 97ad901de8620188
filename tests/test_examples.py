"""Every example runs with tiny settings (and every example is listed here)."""

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# script name -> tiny command-line arguments; add one entry per example
TINY = {
    "lae_vs_vae_digits.py": [
        "--epochs",
        "1",
        "--hidden-dim",
        "128",
        "--depth",
        "1",
        "--refine-steps",
        "2",
        "--eval-samples",
        "5",
    ],
    "bernoulli_vae.py": ["--epochs", "1", "--hidden-dim", "16", "--eval-samples", "10"],
    "ald_conjugate_gaussian.py": ["--num-samples", "60", "--warmup-steps", "20"],
    "ald_multimodal.py": ["--num-samples", "60", "--warmup-steps", "20", "--vi-steps", "20"],
    "vae_digits.py": ["--epochs", "1", "--hidden-dim", "16", "--eval-samples", "10"],
    "ae_gmm_digits.py": ["--epochs", "1", "--hidden-dim", "16", "--eval-samples", "10"],
    "ppca_digits.py": ["--steps", "5", "--em-iters", "5", "--elbo-samples", "2"],
}


def _load(name):
    spec = importlib.util.spec_from_file_location(name[:-3], EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_smoke_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs(name, tmp_path):
    module = _load(name)
    result = module.main(module.parse_args([*TINY[name], "--out", str(tmp_path)]))
    assert isinstance(result, dict) and result
    for key, value in result.items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
