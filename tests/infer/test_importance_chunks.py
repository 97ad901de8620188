"""``chunk_bytes``: the IWAE particle chunk follows a memory budget instead of a count."""

import pyro
import pytest
import torch
from seeding import offset_seed

from pyro_lvm.infer import iwae_log_likelihood
from pyro_lvm.models import VAE


def _passes(vae, x, **kw):
    """The estimate, and the number of particles of each vectorized guide pass."""
    sizes = []

    def guide(x):
        out = vae.guide(x)
        frame = [f for f in pyro.poutine.runtime._PYRO_STACK if hasattr(f, "size")]
        # the calls without the particle plate (one particle as the model is written,
        # which checks the vectorized pass) are not vectorized passes
        sizes.extend(f.size for f in frame if f.name == "_importance_particles")
        return out

    est = iwae_log_likelihood(vae.model, guide, x, num_samples=60, **kw)
    return est, sizes


def test_a_byte_budget_sets_the_particles_per_pass():
    torch.manual_seed(offset_seed(0))
    vae = VAE(20, 3, hidden_dim=16)
    x = torch.bernoulli(torch.full((40, 20), 0.3))
    _, by_count = _passes(vae, x, chunk_size=25)
    assert by_count == [25, 25, 10]
    _, tiny = _passes(vae, x, chunk_bytes=1)
    assert tiny == [1] * 60  # never fewer than one particle per pass
    # the first pass measures one particle's bytes; a huge budget is capped by chunk_size
    _, one = _passes(vae, x, chunk_bytes=10**9)
    assert one == [1, 59]
    est, sized = _passes(vae, x, chunk_bytes=20_000)
    assert sized[0] == 1 and 1 < max(sized) < 59 and sum(sized) == 60


def test_budgeted_estimates_agree_with_fixed_chunks():
    """Paired over datapoints: the two estimates of each log p(x_i) differ by Monte Carlo
    noise only (mean difference within 4 standard errors of the paired differences)."""
    torch.manual_seed(offset_seed(1))
    vae = VAE(20, 3, hidden_dim=16)
    x = torch.bernoulli(torch.full((200, 20), 0.3))
    a = iwae_log_likelihood(vae.model, vae.guide, x, num_samples=50, chunk_size=50)
    b = iwae_log_likelihood(vae.model, vae.guide, x, num_samples=50, chunk_bytes=50_000)
    d = a - b
    assert d.mean().abs() < 4 * d.std() / len(d) ** 0.5 + 1e-6


def test_impossible_budget_is_one_line():
    vae = VAE(20, 3, hidden_dim=16)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive number of bytes"):
        iwae_log_likelihood(vae.model, vae.guide, torch.zeros(2, 20), chunk_bytes=0)
