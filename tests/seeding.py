"""The tests' base seed: every RNG seed in the suite is ``offset_seed(k) = BASE + k``.

``BASE`` is 0 unless ``pytest --base-seed N`` (or ``PYRO_LVM_TEST_SEED=N``) says otherwise,
so the statistical tests can be rerun on fresh random draws: their tolerances come from
their own Monte Carlo error, so they must pass for any base seed at the stated rate
(``.ci/seed-sweep`` runs the suite for several).  Seeds that must agree (common random
numbers) are shifted together and keep agreeing.
"""

from __future__ import annotations

import os


def base_seed() -> int:
    """The base seed of this test session."""
    return int(os.environ.get("PYRO_LVM_TEST_SEED", "0"))


def offset_seed(k: int = 0) -> int:
    """The seed ``k`` of a test, shifted by the session's base seed."""
    return base_seed() + int(k)
