"""The Jacobian correction of the trunk's gradient in LAE training
(:mod:`pyro_lvm.infer.trunk_jacobian`): exact, unbiased under the stationary chain, and
applied by :class:`~pyro_lvm.infer.LAE` to a user's encoder without changing the loss."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from seeding import offset_seed
from torch import nn

from pyro_lvm.infer import LAE
from pyro_lvm.infer.trunk_jacobian import _factor, jacobian_term, log_det_gradient


@pytest.mark.parametrize("jacobian", [True, False])
def test_trunk_gradient_under_the_stationary_chain_is_unbiased_with_the_correction(jacobian):
    """Averaged over the chain's stationary law, LAE's trunk gradient is that of
    ``-log Z = -log p(x) + (d_z/2) log det(G G^T)``: a pull of the features to 0 and to
    low rank. The correction removes that term, so the expected gradient vanishes."""
    gen = torch.Generator().manual_seed(offset_seed(6))
    n, d, d_z, s, draws = 4, 6, 2, 0.3, 20000
    g = torch.randn(n, d, generator=gen, dtype=torch.double).requires_grad_()
    mu = torch.randn(n, d_z, generator=gen, dtype=torch.double)
    # exact stationary chain states for V = sum_i |z_i - mu_i|^2 / (2 s^2), z = G Phi^T:
    # latents from the posterior, Phi their minimal-norm preimage plus a null-space part
    gd = g.detach()
    z = mu + s * torch.randn(draws, n, d_z, generator=gen, dtype=torch.double)
    pinv = torch.linalg.pinv(gd)  # d x n
    null = torch.eye(d, dtype=torch.double) - pinv @ gd
    phi_t = pinv @ z + null @ torch.randn(draws, d, d_z, generator=gen, dtype=torch.double)
    potential = ((g @ phi_t - mu) ** 2).sum((1, 2)) / (2 * s**2)
    loss = potential.mean() + (jacobian_term([g], [d_z]) if jacobian else 0.0)
    (grad,) = torch.autograd.grad(loss, g)
    pull = d_z * torch.linalg.solve(gd @ gd.T, gd)  # (d_z/2) d logdet(G G^T) / dG
    mc_error = 6 * (d_z / draws) ** 0.5 * pull.abs().max()
    expected = torch.zeros_like(pull) if jacobian else pull
    assert (grad - expected).abs().max() < mc_error + 0.05 * pull.abs().max()
    assert pull.abs().max() > 10 * mc_error  # the test can tell the two apart


@pytest.mark.parametrize("n, d", [(4, 6), (9, 6)])
def test_the_correction_is_the_exact_log_det_gradient_for_either_shape(n, d):
    """It factors the smaller Gram matrix (rows when the batch is narrower than the
    features): either way it is exactly -c d/dG logdet(G^T G + eps I)."""
    gen = torch.Generator().manual_seed(offset_seed(9))
    g = torch.randn(n, d, generator=gen, dtype=torch.double).requires_grad_()
    coef, jitter = 1.5, 1e-3
    assert _factor(g, jitter)[1] == (n < d)
    got = log_det_gradient(g, coef, jitter)
    eps = jitter * g.detach().square().sum() / n
    logdet = torch.logdet(g.T @ g + eps * torch.eye(d, dtype=torch.double))
    (expected,) = torch.autograd.grad(-coef * logdet, g)
    torch.testing.assert_close(got, expected)


def test_the_term_is_zero_valued_and_skips_inputs_without_a_trunk():
    g = torch.randn(5, 8, dtype=torch.double).requires_grad_()
    term = jacobian_term([g, torch.randn(5, 3)], [2, 4])
    assert float(term.detach()) == 0.0 and term.requires_grad
    assert jacobian_term([torch.randn(5, 3)], [4]) == 0.0


class PyroStyleEncoder(nn.Module):
    """A trunk and ``(loc, scale)`` heads, as in Pyro's VAE example."""

    def __init__(self, data_dim: int, width: int, latent_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(data_dim, width)
        self.fc21 = nn.Linear(width, latent_dim)
        self.fc22 = nn.Linear(width, latent_dim)

    def forward(self, x):
        hidden = torch.tanh(self.fc1(x))
        return self.fc21(hidden), self.fc22(hidden).exp()


def _trainer(jacobian: bool):
    torch.manual_seed(offset_seed(3))
    decoder = nn.Linear(2, 6)
    encoder = PyroStyleEncoder(6, 16, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=x)

    optim = torch.optim.SGD([*decoder.parameters(), *encoder.parameters()], lr=0.0)
    return LAE(model, encoder, optim, step_size=0.05, jacobian=jacobian), encoder


def test_lae_corrects_the_trunk_of_a_users_encoder_and_reports_the_same_loss():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(offset_seed(4)))
    runs = {}
    for jacobian in (False, True):
        lae, encoder = _trainer(jacobian)
        pyro.set_rng_seed(offset_seed(5))
        loss = lae.step(x)
        runs[jacobian] = (loss, encoder.fc1.weight.grad.clone(), encoder)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)  # the same loss
    # the trunk's gradients differ by exactly the log-det term of fc21's input
    encoder = runs[True][2]
    with torch.no_grad():
        rows = torch.tanh(encoder.fc1(x))
    pull = log_det_gradient(rows, 0.5 * 2)
    hidden = torch.tanh(encoder.fc1(x))
    (expected,) = torch.autograd.grad((hidden * pull).sum(), encoder.fc1.weight)
    torch.testing.assert_close(runs[True][1] - runs[False][1], expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 1e-3  # the correction is not negligible here


def test_a_preconditioned_training_chain_says_the_correction_does_not_apply():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(offset_seed(4)))
    lae, _ = _trainer(True)
    lae.kernel.precondition = 1e-3  # as LAE(..., precondition=1e-3) would set it
    with pytest.warns(RuntimeWarning, match="jacobian=True does not apply with precondition"):
        lae.step(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        lae.step(x)  # once per trainer
        off, _ = _trainer(False)
        off.kernel.precondition = 1e-3
        off.step(x)  # asked for no correction: nothing to say
