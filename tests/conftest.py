import os

import pyro
import pytest
import torch
from seeding import base_seed, offset_seed

os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_addoption(parser):
    parser.addoption(
        "--base-seed",
        type=int,
        default=None,
        help="shift every RNG seed of the tests by this (default: $PYRO_LVM_TEST_SEED or 0)",
    )


def pytest_configure(config):
    seed = config.getoption("--base-seed")
    if seed is not None:
        # seeding.base_seed() reads the environment, so helpers imported anywhere agree
        os.environ["PYRO_LVM_TEST_SEED"] = str(seed)


def pytest_report_header(config):
    return f"pyro_lvm test base seed: {base_seed()}"


@pytest.fixture(autouse=True)
def _seed_and_clear():
    """Every test starts from the same seed, an empty param store and validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(offset_seed(0))
    pyro.enable_validation(True)
    threads = torch.get_num_threads()
    # the models under test are small: one thread is faster and immune to oversubscription
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Run a test in double precision (exact-answer comparisons)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
