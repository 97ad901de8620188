"""Particle gradient descent against PPCA's exact answers: its decoder gradient is the
marginal likelihood's (Fisher's identity), its particles sample the exact posterior, and
it converges to the closed-form maximum-likelihood solution."""

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from bernoulli_toy import assert_unbiased
from seeding import offset_seed

from pyro_lvm.infer import PGD
from pyro_lvm.infer.pgd import MultiStartMAP
from pyro_lvm.models import PPCA, ppca_log_likelihood, ppca_mle, ppca_posterior


def _data(n=30, d=5, q=2, seed=0):
    g = torch.Generator().manual_seed(offset_seed(seed))
    w = torch.randn(d, q, generator=g, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    z = torch.randn(n, q, generator=g, dtype=torch.float64)
    return z @ w.T + mu + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)


def _ppca(d=5, q=2, seed=1):
    pyro.set_rng_seed(offset_seed(seed))
    return PPCA(d, q).double()


def _theta(ppca):
    return [ppca.decoder.weight, ppca.decoder.bias, ppca.likelihood.log_scale]


def _grads(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


def _exact_posterior_particles(ppca, x, k):
    mean, cov = ppca_posterior(x, ppca.params())
    post = dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(cov))
    return post.sample((k,)).transpose(0, 1)  # (N, K, q)


def test_decoder_gradient_is_the_marginal_likelihood_gradient(float64):
    """With particles from the exact posterior the PGD gradient is unbiased for
    -grad sum_i log p(x_i) (Fisher's identity): the fixed points are the MLE."""
    x = _data()
    ppca = _ppca()  # a random theta: the exact gradient is far from zero
    theta = _theta(ppca)
    exact = torch.autograd.grad(-ppca_log_likelihood(x, ppca.params()).sum(), theta)
    exact = torch.cat([g.reshape(-1) for g in exact])
    pgd = PGD(ppca.model, torch.optim.SGD(theta, lr=0.0), num_particles=3)
    idx = torch.arange(x.shape[0])
    pgd.step(x, idx)  # allocates the table
    samples = []
    for _ in range(300):
        pgd.particles = _exact_posterior_particles(ppca, x, 3)
        pgd.step(x, idx)
        samples.append(_grads(theta).clone())
    assert exact.abs().max() > 1.0
    assert_unbiased(torch.stack(samples), exact)


def test_particles_sample_each_rows_exact_posterior(float64):
    """From the prior, minibatches in shuffled order: each row's particles (its own,
    found by dataset index) settle on its exact posterior; theta is held fixed."""
    x = _data(n=12)
    ppca = _ppca()
    k = 400
    pgd = PGD(ppca.model, torch.optim.SGD(_theta(ppca), lr=0.0), num_particles=k)
    for _ in range(120):
        perm = torch.randperm(x.shape[0])
        for rows in perm.split(4):
            pgd.step(x[rows], rows)
    mean, cov = ppca_posterior(x, ppca.params())
    particles = pgd.particles[: x.shape[0]]  # (N, K, q), iid across K at a fixed time
    sd = cov.diagonal().sqrt().expand_as(mean)
    z = 4.5  # Bonferroni over N * q coordinates, two moments
    assert ((particles.mean(1) - mean).abs() < z * sd / math.sqrt(k)).all()
    var_se = math.sqrt(2 / (k - 1)) * sd**2
    assert ((particles.var(1) - sd**2).abs() < z * var_se).all()
    assert 0.3 < pgd.metrics()["accept_rate"] < 0.8


def test_only_the_batchs_rows_move_and_resume_is_exact(float64):
    x = _data(n=10)
    ppca, twin = _ppca(), _ppca()

    def driver(model):
        return PGD(model.model, torch.optim.Adam(_theta(model), lr=0.01), num_particles=2)

    pgd = driver(ppca)
    pgd.step(x[:4], torch.arange(4))
    before = pgd.particles.clone()
    pgd.step(x[4:6], torch.tensor([4, 5]))
    assert torch.equal(pgd.particles[:4], before[:4])  # rows 0-3 not visited: unchanged
    assert pgd.initialized[:6].all() and not pgd.initialized[6:].any()
    # a checkpoint: the modules and the driver (optimizer, particle table, step size)
    twin.load_state_dict(ppca.state_dict())
    state = copy.deepcopy(pgd.state_dict())  # as torch.save / torch.load would
    resumed = driver(twin)
    resumed.load_state_dict(state)
    for model_driver in (pgd, resumed):
        pyro.set_rng_seed(offset_seed(3))
        model_driver.step(x[2:8], torch.arange(2, 8))
    assert torch.equal(pgd.particles, resumed.particles)
    assert all(torch.equal(a, b) for a, b in zip(_theta(ppca), _theta(twin)))


def test_bad_indices_and_global_latents_are_one_line_errors(float64):
    x = _data(n=4)
    ppca = _ppca()
    pgd = PGD(ppca.model, torch.optim.SGD(_theta(ppca), lr=0.0))
    for idx, match in ((None, "needs the batch's dataset row indices"), ([0, 0, 1, 2], "repeats")):
        with pytest.raises(ValueError, match=match) as err:
            pgd.step(x, idx)
        assert "\n" not in str(err.value)

    def with_global(x):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), scale).to_event(1), obs=x)

    with pytest.raises(ValueError, match="outside the data plate"):
        PGD(with_global, torch.optim.SGD(_theta(ppca), lr=0.0)).step(x, torch.arange(4))


@pytest.mark.slow
def test_converges_to_the_maximum_likelihood_solution(float64):
    """From a random start, minibatches of 50, Adam with a decayed rate: the log
    likelihood reaches the closed-form MLE's to 1e-3 nats per datapoint (from 6)."""
    x = _data(n=200, d=6)
    best = ppca_log_likelihood(x, ppca_mle(x, 2)).mean()
    ppca = _ppca(d=6)
    optim = torch.optim.Adam(_theta(ppca), lr=0.02)
    pgd = PGD(ppca.model, optim, num_particles=10)
    gap0 = float(best - ppca.exact_log_likelihood(x).mean().detach())
    for epoch in range(1500):
        if epoch == 1000:
            for group in optim.param_groups:
                group["lr"] = 0.002
        perm = torch.randperm(x.shape[0])
        for rows in perm.split(50):
            pgd.step(x[rows], rows)
    gap = float(best - ppca.exact_log_likelihood(x).mean().detach())
    assert gap0 > 1.0 and -1e-9 < gap < 1e-3


def test_multi_start_map_finds_each_rows_highest_mode(float64):
    """PPCA: the posterior is Gaussian, its mode is the exact posterior mean. A bimodal
    1-d posterior: the best start is the global mode (found here on a fine grid)."""
    x = _data(n=6)
    ppca = _ppca()
    mode = MultiStartMAP(ppca.model, num_starts=3, num_iters=600, lr=0.05)(x)
    assert torch.allclose(mode, ppca_posterior(x, ppca.params())[0], atol=1e-4)

    obs = torch.tensor([[1.0], [0.6], [1.4]], dtype=torch.float64)

    def bimodal(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 1]).to_event(1))
            loc = z**2 + 0.3 * z
            pyro.sample("x", dist.Normal(loc, 0.05).to_event(1), obs=x)

    grid = torch.linspace(-3, 3, 600001, dtype=torch.float64)[:, None, None]
    log_joint = dist.Normal(0.0, 1.0).log_prob(grid) + dist.Normal(
        grid**2 + 0.3 * grid, 0.05
    ).log_prob(obs)
    best = grid.squeeze(-1)[log_joint.squeeze(-1).argmax(0), 0]  # (B,)
    pyro.set_rng_seed(offset_seed(5))
    found = MultiStartMAP(bimodal, num_starts=16, num_iters=600, lr=0.02)(obs)
    assert torch.allclose(found.squeeze(-1), best, atol=1e-3)


def test_a_model_written_for_one_draw_trains(float64):
    """``.expand`` to the batch's rows cannot take the particles' dimension: PGD evaluates
    it one particle at a time (as AIS and refinement do) and moves the same way as the
    model written with broadcasting once both start from the same particles."""
    import written_models as wm

    A, c, _ = wm.params()
    x = wm.data(4, seed=offset_seed(1))
    energies = {}
    for model in (wm.model_plate, wm.model_expand):
        pyro.set_rng_seed(offset_seed(2))
        scale = torch.nn.Parameter(torch.ones(()))  # a trained parameter, held at lr 0
        pgd = PGD(
            lambda x, m=model, s=scale: m(x, A * s, c),
            torch.optim.SGD([scale], lr=0.0),
            num_particles=3,
            num_steps=2,
            adapt_step_size=False,
        )
        pgd._gather(pgd._spec(x), x, torch.arange(4))  # particles created
        pgd.particles.zero_()  # the same start for both models
        energies[model.__name__] = [pgd.step(x, torch.arange(4)) for _ in range(3)]
    assert all(math.isfinite(e) for e in energies["model_expand"])
    assert energies["model_expand"][0] == pytest.approx(energies["model_plate"][0], rel=1e-10)
