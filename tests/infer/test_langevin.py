"""The MALA/ULA functional core against hand computations and exact Gaussian answers.

Tolerances are ``Z`` Monte Carlo standard errors; chains are run in parallel (one row of
the batch per chain) so every test is vectorized and fast.
"""

import math

import pytest
import torch
from pyro.infer import HMC, MCMC
from pyro.ops.stats import effective_sample_size

from pyro_lvm.infer.mcmc import (
    LangevinState,
    dual_averaging_init,
    dual_averaging_step_size,
    dual_averaging_update,
    langevin_init,
    langevin_step,
    mala_log_accept_ratio,
    potential_and_grad,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: one thread is ~10x faster than two on a shared, busy CPU
    # (the conftest fixture restores the thread count after each test)
    torch.set_num_threads(1)


Z = 4.5  # standard errors allowed (several comparisons per test)


def gaussian_1d(m, s):
    """V(x) = (x - m)^2 / (2 s^2), one chain per row of x of shape (C, 1)."""
    return lambda x: ((x - m) ** 2).sum(-1) / (2 * s**2)


def test_log_accept_ratio_matches_hand_computation(float64):
    m, s, eta, x, xi = 1.0, 1.5, 0.2, 0.3, 0.7
    potential = gaussian_1d(m, s)

    def v(y):
        return (y - m) ** 2 / (2 * s**2)

    def dv(y):
        return (y - m) / s**2

    x_new = x - eta * dv(x) + math.sqrt(2 * eta) * xi
    log_q_fwd = -((x_new - x + eta * dv(x)) ** 2) / (4 * eta)  # log q(x' | x) + const
    log_q_bwd = -((x - x_new + eta * dv(x_new)) ** 2) / (4 * eta)  # log q(x | x') + const
    expected = -v(x_new) + v(x) + log_q_bwd - log_q_fwd

    state = langevin_init(torch.tensor([x]), potential)
    assert state.potential.shape == ()
    new_state, info = langevin_step(state, potential, eta, noise=torch.tensor([xi]))
    assert float(info.log_accept_ratio) == pytest.approx(expected, rel=1e-12)
    assert float(info.accept_prob) == pytest.approx(min(1.0, math.exp(expected)), rel=1e-12)
    proposal = langevin_init(torch.tensor([x_new]), potential)
    direct = mala_log_accept_ratio(state, proposal, eta)
    assert direct.item() == pytest.approx(expected, rel=1e-12)
    moved = new_state.position.item() == pytest.approx(x_new)
    assert moved == bool(info.accepted)


def test_potential_and_grad_per_chain():
    x = torch.randn(5, 3)
    potential, grad = potential_and_grad(lambda y: (y**3).sum(-1), x)
    assert potential.shape == (5,) and not potential.requires_grad
    torch.testing.assert_close(grad, 3 * x**2)


def test_non_finite_proposal_is_a_rejection():
    # V = +inf for x > 0.5 and NaN gradient there: a large step lands there often
    def potential(x):
        v = (x**2).sum(-1) / 2
        return torch.where(x.sum(-1) > 0.5, torch.full_like(v, math.nan), v)

    state = langevin_init(torch.zeros(200, 1), potential)
    for _ in range(20):
        state, info = langevin_step(state, potential, 1.0, event_dim=1)
        assert torch.isfinite(state.position).all() and torch.isfinite(state.potential).all()
        assert (state.position <= 0.5).all()
    assert (info.accept_prob[~torch.isfinite(info.log_accept_ratio)] == 0).all()
    # ULA also refuses a non-finite proposal
    state, info = langevin_step(state, potential, 1.0, event_dim=1, mh=False)
    assert torch.isfinite(state.position).all()
    assert info.accept_prob.min() == 0 and info.accept_prob.max() == 1


def test_bad_step_size():
    state = langevin_init(torch.zeros(1), lambda x: (x**2).sum())
    with pytest.raises(ValueError, match="step_size must be positive"):
        langevin_step(state, lambda x: (x**2).sum(), 0.0)
    with pytest.raises(ValueError, match="step_size must be positive"):
        dual_averaging_init(-1.0)


def _run(potential, position, step_size, num_steps, burn_in, mh=True):
    state = langevin_init(position, potential)
    draws, accept = [], []
    for i in range(num_steps):
        state, info = langevin_step(state, potential, step_size, mh=mh, event_dim=1)
        if i >= burn_in:
            draws.append(state.position)
            accept.append(info.accept_prob)
    return torch.stack(draws, 1), torch.stack(accept, 1)  # (chains, steps, dim)


def _check_moments(draws, mean, var):
    """Mean and variance per dimension within Z standard errors.

    The chains are independent, so each chain's time average is an independent draw of the
    estimator: its spread across chains is an honest Monte Carlo standard error whatever
    the autocorrelation within a chain.
    """
    num_chains = draws.shape[0]
    for d in range(draws.shape[-1]):
        xs = draws[..., d]
        sq = (xs - mean[d]) ** 2
        for stat, truth in ((xs, mean[d]), (sq, var[d])):
            per_chain = stat.mean(1)
            se = per_chain.std() / math.sqrt(num_chains)
            assert abs(per_chain.mean() - truth) < Z * se, (d, per_chain.mean(), truth, se)


def test_mala_samples_a_gaussian(float64):
    m, s = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])

    def potential(x):
        return (((x - m) / s) ** 2).sum(-1) / 2

    draws, accept = _run(potential, torch.zeros(100, 2), 0.3, 150, 50)
    assert 0.2 < accept.mean() < 0.95  # the test exercises the rejection branch
    _check_moments(draws, m, s**2)


def test_ula_bias_matches_theory(float64):
    # ULA on N(m, s^2) with step eta is the AR(1) chain x' = m + (1 - eta/s^2)(x - m)
    # + sqrt(2 eta) xi, whose stationary variance v solves v = (1 - eta/s^2)^2 v + 2 eta:
    # v = s^2 / (1 - eta / (2 s^2)). At eta = s^2 the draws are independent N(m, 2 s^2).
    m, s, eta = 1.0, 0.5, 0.25
    draws, accept = _run(gaussian_1d(m, s), torch.zeros(200, 1), eta, 60, 20, mh=False)
    assert (accept == 1).all()
    inflated = s**2 / (1 - eta / (2 * s**2))
    assert inflated == pytest.approx(2 * s**2)
    _check_moments(draws, torch.tensor([m]), torch.tensor([inflated]))
    # ... and MALA at the same step corrects the bias
    draws, _ = _run(gaussian_1d(m, s), torch.zeros(200, 1), eta, 100, 20)
    _check_moments(draws, torch.tensor([m]), torch.tensor([s**2]))


def test_per_chain_step_sizes():
    potential = gaussian_1d(0.0, 1.0)
    state = langevin_init(torch.zeros(3, 1), potential)
    eta = torch.tensor([1e-6, 1e-6, 1.0])
    state, info = langevin_step(state, potential, eta, event_dim=1)
    assert info.accept_prob.shape == (3,) and info.step_size.shape == (3,)
    assert (info.accept_prob[:2] > 0.99).all()  # tiny steps: almost surely accepted
    assert state.position[:2].abs().max() < 0.01


def test_keep_graph_selects_the_chosen_potential():
    w = torch.tensor(2.0, requires_grad=True)

    def potential(x):
        return w * (x**2).sum()

    state = langevin_init(torch.tensor([1.0]), potential, keep_graph=True)
    new, info = langevin_step(state, potential, 0.1, keep_graph=True)
    (dw,) = torch.autograd.grad(new.potential, w)
    assert dw.item() == pytest.approx((new.position**2).sum().item())


def test_dual_averaging_reaches_target_acceptance(float64):
    # 10-d anisotropic Gaussian; 50 chains share one step size adapted on their mean
    # acceptance probability, starting far too small
    scales = torch.linspace(0.5, 2.0, 10)

    def potential(x):
        return ((x / scales) ** 2).sum(-1) / 2

    state = langevin_init(torch.randn(50, 10) * scales, potential)
    adapt = dual_averaging_init(1e-4)
    for _ in range(200):
        step_size = dual_averaging_step_size(adapt)
        state, info = langevin_step(state, potential, step_size, event_dim=1)
        adapt = dual_averaging_update(adapt, info.accept_prob.mean(), 0.574)
    final = dual_averaging_step_size(adapt, final=True)
    accept = []
    for _ in range(100):
        state, info = langevin_step(state, potential, final, event_dim=1)
        accept.append(info.accept_prob.mean())
    accept = torch.stack(accept)
    # the adapted step is close to, but (a finite-run average) not exactly at, the target
    assert abs(accept.mean() - 0.574) < 0.05
    assert final > 1e-2  # it moved far from the initial 1e-4 (acceptance ~1 there)


def test_dual_averaging_window_keeps_tracking():
    # after a long phase at a fixed optimum, the target changes (acceptance collapses):
    # textbook dual averaging's gain decays like 1/(gamma sqrt(t)); a capped counter keeps
    # the gain of step max_t (about 0.28 vs 2 per unit of acceptance error here)
    def run(max_t):
        adapt = dual_averaging_init(1.0)
        for _ in range(5000):
            adapt = dual_averaging_update(adapt, 0.574, 0.574, max_t=max_t)
        before = float(adapt.log_step_size)
        for _ in range(20):
            adapt = dual_averaging_update(adapt, 0.0, 0.574, max_t=max_t)
        return before - float(adapt.log_step_size)

    slow, fast = run(None), run(100)
    assert 0 < slow and 5 * slow < fast


def test_one_leapfrog_hmc_has_the_same_stationary_moments(float64):
    # HMC with one leapfrog step eps and unit mass is MALA with eta = eps^2 / 2
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]])
    prec = torch.linalg.inv(cov)
    m = torch.tensor([0.5, -1.0])

    def potential_batched(x):
        d = x - m
        return 0.5 * ((d @ prec) * d).sum(-1)

    def potential_hmc(params):
        return potential_batched(params["x"])

    eps = 0.8
    hmc = HMC(potential_fn=potential_hmc, step_size=eps, num_steps=1, adapt_step_size=False)
    mcmc = MCMC(
        hmc,
        num_samples=1000,
        warmup_steps=100,
        initial_params={"x": torch.zeros(2)},
        disable_progbar=True,
    )
    mcmc.run()
    hmc_draws = mcmc.get_samples()["x"]
    draws, _ = _run(potential_batched, torch.zeros(100, 2), eps**2 / 2, 100, 30)
    _check_moments(draws, m, cov.diagonal())
    for d in range(2):
        # one HMC chain: standard errors from its effective sample size
        a, b = hmc_draws[:, d], draws[..., d]
        ess = effective_sample_size(a[None], 0, 1)
        # Var[(x - m)^2] = 2 var^2 for a Gaussian
        for stat_a, stat_b, sd in (
            (a, b, cov[d, d].sqrt()),
            ((a - m[d]) ** 2, (b - m[d]) ** 2, math.sqrt(2) * cov[d, d]),
        ):
            se_a = sd / ess.sqrt()
            se_b = stat_b.mean(1).std() / math.sqrt(b.shape[0])
            assert abs(stat_a.mean() - stat_b.mean()) < Z * (se_a**2 + se_b**2).sqrt()


def test_state_is_a_named_tuple():
    state = langevin_init(torch.zeros(2), lambda x: (x**2).sum())
    assert isinstance(state, LangevinState)
    position, potential, grad = state
    assert potential.shape == () and grad.shape == position.shape
