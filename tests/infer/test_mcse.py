"""pyro_lvm.infer.mcse against AR(1) chains, whose ESS and mean error are known exactly."""

import math

import pytest
import torch
from seeding import offset_seed

from pyro_lvm.infer.mcse import (
    compare_draws,
    effective_sample_size,
    max_z_threshold,
    mean_z_scores,
    summarize_draws,
)


def ar1(num_draws: int, shape: tuple, rho: float, seed: int, mean: float = 0.0) -> torch.Tensor:
    """Stationary AR(1) draws with N(mean, 1) marginals: ESS = S (1 - rho) / (1 + rho)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_draws, *shape), generator=gen, dtype=torch.float64)
    x = torch.empty_like(noise)
    x[0] = noise[0]
    scale = math.sqrt(1 - rho**2)
    for t in range(1, num_draws):
        x[t] = rho * x[t - 1] + scale * noise[t]
    return x + mean


def test_ess_of_ar1_chains_matches_the_closed_form():
    rho, S = 0.8, 20_000
    ess = effective_sample_size(ar1(S, (40,), rho, offset_seed(0)))
    exact = S * (1 - rho) / (1 + rho)
    assert ess.shape == (40,)
    assert abs(float(ess.median()) / exact - 1) < 0.1


def test_z_scores_of_two_correct_samplers_are_standard_normal():
    # with autocorrelated draws a naive MCSE (S instead of ESS) makes |z| 3x too large:
    # the spread of z over 200 coordinates tells them apart
    rho, S = 0.8, 4000
    a = summarize_draws(ar1(S, (200,), rho, offset_seed(1)))
    b = summarize_draws(ar1(S, (200,), rho, offset_seed(2)))
    z = mean_z_scores(a, b)
    assert 0.8 < float(z.std()) < 1.2
    assert float(z.abs().max()) < max_z_threshold(200, 0.001)


def test_compare_draws_flags_a_biased_sampler_and_reports_ess_per_draw():
    S, rho = 2000, 0.5
    reference = {"z": ar1(S, (3, 2), rho, offset_seed(3))}
    good = {"z": ar1(S, (3, 2), rho, offset_seed(4))}
    biased = {"z": ar1(S, (3, 2), rho, offset_seed(5), mean=0.3)}
    ok = compare_draws(good, reference)
    bad = compare_draws(biased, reference)
    assert ok.num_coordinates == 6 and ok.max_abs_z < max_z_threshold(6, 0.001)
    # 0.3 / sqrt(2 * 3 / 2000) = 5.5 standard errors
    assert bad.max_abs_z > 4 and bad.frac_abs_z_above_3 > 0.5
    exact = (1 - rho) / (1 + rho)
    assert 0.5 * exact < ok.min_ess_per_draw < 1.2 * exact


def test_select_leaves_coordinates_out_and_chains_are_pooled():
    S = 500
    reference = {"z": ar1(S, (4,), 0.0, offset_seed(6))}
    draws = ar1(S, (4,), 0.0, offset_seed(7)).reshape(1, S, 4).expand(2, S, 4).clone()
    draws[..., 3] += 100.0  # a flat, wandering coordinate
    select = {"z": torch.tensor([True, True, True, False])}
    result = compare_draws({"z": draws}, reference, chains=True, select=select)
    assert result.num_coordinates == 3 and result.max_abs_z < 5
    assert result.summaries["z"][0].num_draws == 2 * S
    assert float(result.z["z"][3].abs()) > 100


def test_a_frozen_chain_has_ess_one_and_nan_or_mismatches_are_refused():
    frozen = torch.full((100, 2), 0.5, dtype=torch.float64)
    assert effective_sample_size(frozen).tolist() == [1.0, 1.0]
    reference = {"z": torch.randn(100, 2, dtype=torch.float64)}
    assert compare_draws({"z": frozen}, reference).max_abs_z > 0
    with pytest.raises(ValueError, match="NaN"):
        summarize_draws(torch.tensor([[0.0], [float("nan")], [1.0], [2.0]]))
    with pytest.raises(ValueError, match="shape"):
        compare_draws({"z": torch.randn(100, 3)}, {"z": torch.randn(100, 2)})
    with pytest.raises(ValueError, match="reference lacks"):
        compare_draws({"w": torch.randn(100, 2)}, reference)


def test_max_z_threshold_is_the_two_sided_normal_quantile():
    assert abs(max_z_threshold(1, 0.05) - 1.959964) < 1e-5
    assert 3.8 < max_z_threshold(100, 0.01) < 3.9


@pytest.mark.parametrize("chains", [1, 3])
@pytest.mark.parametrize("num_draws", [200, 201])
def test_ess_equals_pyros_estimator(chains, num_draws):
    from pyro.ops.stats import effective_sample_size as pyro_ess

    x = torch.stack([ar1(num_draws, (5,), 0.6, offset_seed(10 + c)) for c in range(chains)])
    ours = effective_sample_size(x, chains=True)
    assert torch.allclose(ours, pyro_ess(x, chain_dim=0, sample_dim=1), rtol=1e-10)


def test_ess_of_antithetic_draws_is_positive_and_bounded():
    # alternating draws: Pyro's raw estimate is negative; Stan's bound caps it at S log10 S
    from pyro.ops.stats import effective_sample_size as pyro_ess

    x = torch.tensor([1.0, -1.0] * 10, dtype=torch.float64)[:, None]
    x = x + 1e-3 * torch.randn(20, 1, dtype=torch.float64)
    assert float(pyro_ess(x[None], 0, 1)) < 0
    assert float(effective_sample_size(x)) == pytest.approx(20 * math.log10(20))
