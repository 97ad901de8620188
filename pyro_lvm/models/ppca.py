r"""Probabilistic principal component analysis (Tipping & Bishop 1999).

The generative model is linear-Gaussian,

.. math::

    z \sim \mathcal N(0, I_q), \qquad x \mid z \sim \mathcal N(W z + \mu, \sigma^2 I_D),

so the marginal likelihood and the posterior are Gaussian and known exactly:

.. math::

    p(x) = \mathcal N(x; \mu, C), \quad C = W W^\top + \sigma^2 I, \qquad
    p(z \mid x) = \mathcal N\!\left(M^{-1} W^\top (x - \mu),\ \sigma^2 M^{-1}\right),
    \quad M = W^\top W + \sigma^2 I_q .

That makes PPCA the oracle for every approximate method in this library: an ELBO, an
importance-weighted bound or a gradient-trained model can be compared with the exact
numbers. This module has a pure functional core (:func:`ppca_mle`, :func:`ppca_em`,
:func:`ppca_log_likelihood`, :func:`ppca_posterior` on :class:`PPCAParams`) and the Pyro
model :class:`PPCA`, whose amortized guide can represent the exact posterior.

References
----------
Tipping, Bishop (1999), "Probabilistic Principal Component Analysis", JRSS B 61(3).
Roweis (1998), "EM Algorithms for PCA and SPCA", NeurIPS.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_lvm.models.base import LatentVariableModel
from pyro_lvm.models.likelihoods import GaussianLikelihood, check_finite

__all__ = [
    "PPCA",
    "PPCAParams",
    "ppca_em",
    "ppca_log_likelihood",
    "ppca_mle",
    "ppca_posterior",
]


class PPCAParams(NamedTuple):
    """Parameters of a PPCA model.

    Attributes
    ----------
    W : Tensor
        Loading matrix, shape ``(D, q)``.
    mu : Tensor
        Data mean, shape ``(D,)``.
    sigma2 : Tensor
        Isotropic noise variance :math:`\\sigma^2`, a scalar tensor.
    """

    W: torch.Tensor
    mu: torch.Tensor
    sigma2: torch.Tensor


# -- functional core ------------------------------------------------------------------------
def _check_inputs(x: torch.Tensor, latent_dim: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"PPCA needs data of shape (N, D), got {tuple(x.shape)}; flatten it")
    if x.shape[0] < 2:
        raise ValueError(f"PPCA needs at least 2 datapoints, got {x.shape[0]}")
    if not 0 < latent_dim < x.shape[1]:
        raise ValueError(
            f"PPCA latent_dim must be in [1, D-1] = [1, {x.shape[1] - 1}], got {latent_dim}"
        )
    check_finite(x)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and the maximum-likelihood (1/N) covariance, in float64."""
    x64 = x.double()
    mu = x64.mean(0)
    xc = x64 - mu
    return mu, xc.T @ xc / x.shape[0]


def _canonical_signs(W: torch.Tensor) -> torch.Tensor:
    """Flip columns so each one's largest-magnitude entry is positive (reproducible W)."""
    idx = W.abs().argmax(0)
    signs = torch.sign(W.gather(0, idx.unsqueeze(0))).squeeze(0)
    return W * torch.where(signs == 0, torch.ones_like(signs), signs)


def ppca_mle(x: torch.Tensor, latent_dim: int) -> PPCAParams:
    r"""Closed-form maximum-likelihood PPCA (Tipping & Bishop 1999, eqs. 7-8).

    With :math:`S = \frac1N \sum_n (x_n - \bar x)(x_n - \bar x)^\top = U \Lambda U^\top`
    (eigenvalues in decreasing order),

    .. math::

        \mu = \bar x, \qquad
        \sigma^2 = \frac{1}{D - q} \sum_{j > q} \lambda_j, \qquad
        W = U_q (\Lambda_q - \sigma^2 I)^{1/2}

    (the rotation :math:`R = I`; column signs are fixed so the largest entry of each
    column is positive). Computed in float64 and returned in ``x.dtype``.

    Parameters
    ----------
    x : Tensor
        Data, shape ``(N, D)``.
    latent_dim : int
        Number of principal components :math:`q`, ``1 <= q < D``.
    """
    _check_inputs(x, latent_dim)
    mu, S = _moments(x)
    evals, evecs = torch.linalg.eigh(S)  # ascending
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    sigma2 = evals[latent_dim:].mean()
    # below ~1e-10 of the top eigenvalue, sigma^2 is eigensolver round-off, not noise
    if not sigma2 > 1e-10 * evals[0]:
        raise ValueError(
            f"the data lie (numerically) in a subspace of dimension <= {latent_dim}, so the "
            "noise variance is zero; use a smaller latent_dim"
        )
    W = evecs[:, :latent_dim] * (evals[:latent_dim] - sigma2).clamp(min=0).sqrt()
    W = _canonical_signs(W)
    return PPCAParams(W.to(x.dtype), mu.to(x.dtype), sigma2.to(x.dtype))


def _mean_log_likelihood(S: torch.Tensor, W: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    r"""Mean log-likelihood :math:`-\frac12(D\log 2\pi + \log|C| + \mathrm{tr}\,C^{-1}S)`
    at :math:`\mu = \bar x`, from the covariance ``S`` (Woodbury, no ``D x D`` solve)."""
    D, q = W.shape
    L = torch.linalg.cholesky(W.T @ W + sigma2 * torch.eye(q, dtype=W.dtype, device=W.device))
    logdet = (D - q) * sigma2.log() + 2 * L.diagonal().log().sum()
    A = torch.linalg.solve_triangular(L, W.T, upper=False)  # L^{-1} W^T, (q, D)
    trace = (S.diagonal().sum() - (A @ S * A).sum()) / sigma2
    return -0.5 * (D * math.log(2 * math.pi) + logdet + trace)


def ppca_em(
    x: torch.Tensor,
    latent_dim: int,
    num_iters: int,
    init: PPCAParams | None = None,
    tol: float = 0.0,
    generator: torch.Generator | None = None,
) -> PPCAParams:
    r"""Maximum-likelihood PPCA by EM (Tipping & Bishop 1999, eqs. 29-30).

    With :math:`\mu = \bar x`, the ML covariance :math:`S` and
    :math:`M = W^\top W + \sigma^2 I`, each iteration is

    .. math::

        \tilde W = S W \left(\sigma^2 I + M^{-1} W^\top S W\right)^{-1}, \qquad
        \tilde\sigma^2 = \frac1D \mathrm{tr}\!\left(S - S W M^{-1} \tilde W^\top\right),

    which never decreases the likelihood and converges to the closed form
    (:func:`ppca_mle`) up to a rotation of :math:`W`. Runs in float64, ``O(D^2 q)`` per
    iteration.

    Parameters
    ----------
    x : Tensor
        Data, shape ``(N, D)``.
    latent_dim : int
        :math:`q`, ``1 <= q < D``.
    num_iters : int
        Maximum number of EM iterations.
    init : PPCAParams, optional
        Starting point (its ``mu`` is ignored: the ML mean is the data mean). Default:
        ``W`` with standard normal entries scaled to the data, :math:`\sigma^2` the mean
        variance.
    tol : float
        Stop early once an iteration raises the mean log-likelihood by less than ``tol``
        nats (0: run all ``num_iters``).
    generator : torch.Generator, optional
        Random source for the default initialisation.
    """
    _check_inputs(x, latent_dim)
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    mu, S = _moments(x)
    D, q = S.shape[0], latent_dim
    eye = torch.eye(q, dtype=S.dtype, device=S.device)
    if init is None:
        scale = (S.diagonal().mean() / q).sqrt()
        W = scale * torch.randn(D, q, generator=generator, dtype=S.dtype).to(S.device)
        sigma2 = S.diagonal().mean()
    else:
        if init.W.shape != (D, q):
            raise ValueError(f"init.W must have shape {(D, q)}, got {tuple(init.W.shape)}")
        W, sigma2 = init.W.detach().double(), torch.as_tensor(init.sigma2).detach().double()
    previous = _mean_log_likelihood(S, W, sigma2) if tol > 0 else None
    for _ in range(num_iters):
        M = W.T @ W + sigma2 * eye
        SW = S @ W
        Minv_WtSW = torch.linalg.solve(M, W.T @ SW)
        W_new = torch.linalg.solve(sigma2 * eye + Minv_WtSW, SW, left=False)
        sigma2 = (S.diagonal().sum() - (SW * torch.linalg.solve(M, W_new.T).T).sum()) / D
        W = W_new
        if tol > 0:
            current = _mean_log_likelihood(S, W, sigma2)
            if current - previous < tol:
                break
            previous = current
    return PPCAParams(W.to(x.dtype), mu.to(x.dtype), sigma2.to(x.dtype))


def _cholesky_M(params: PPCAParams) -> torch.Tensor:
    W, sigma2 = params.W, params.sigma2
    eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
    return torch.linalg.cholesky(W.T @ W + sigma2 * eye)


def ppca_log_likelihood(x: torch.Tensor, params: PPCAParams) -> torch.Tensor:
    r"""Exact per-datapoint :math:`\log \mathcal N(x; \mu, W W^\top + \sigma^2 I)`.

    Uses the determinant lemma and, for the Mahalanobis term, the posterior mean
    :math:`\hat z = M^{-1} W^\top (x - \mu)`:

    .. math::

        \log|C| = (D - q)\log\sigma^2 + \log|M|, \qquad
        (x-\mu)^\top C^{-1} (x-\mu) = \frac{\lVert x - \mu - W\hat z\rVert^2}{\sigma^2}
        + \lVert \hat z\rVert^2 ,

        \log p(x) = -\tfrac12\left(D \log 2\pi + \log|C|
        + (x-\mu)^\top C^{-1}(x-\mu)\right).

    The second identity is a sum of squares (no cancellation between large terms), and
    the cost is :math:`O(N D q + D q^2)`, so ``D = 784`` is cheap. Differentiable in
    ``params``.

    Parameters
    ----------
    x : Tensor
        Data, shape ``(..., D)``.
    params : PPCAParams

    Returns
    -------
    Tensor
        Shape ``x.shape[:-1]``, nats.
    """
    W, mu, sigma2 = params
    D, q = W.shape
    L = _cholesky_M(params)
    r = x - mu
    z_hat = torch.cholesky_solve((r @ W).unsqueeze(-1), L).squeeze(-1)
    resid = r - z_hat @ W.T
    maha = resid.pow(2).sum(-1) / sigma2 + z_hat.pow(2).sum(-1)
    logdet = (D - q) * sigma2.log() + 2 * L.diagonal().log().sum()
    return -0.5 * (D * math.log(2 * math.pi) + logdet + maha)


def ppca_posterior(x: torch.Tensor, params: PPCAParams) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact posterior :math:`p(z \mid x) = \mathcal N(M^{-1} W^\top (x - \mu),
    \sigma^2 M^{-1})` with :math:`M = W^\top W + \sigma^2 I`.

    Returns
    -------
    mean : Tensor
        Shape ``x.shape[:-1] + (q,)``.
    cov : Tensor
        Shape ``(q, q)``, the same for every datapoint.
    """
    W, mu, sigma2 = params
    L = _cholesky_M(params)
    mean = torch.cholesky_solve(((x - mu) @ W).unsqueeze(-1), L).squeeze(-1)
    return mean, sigma2 * torch.cholesky_inverse(L)


# -- Pyro model -----------------------------------------------------------------------------
class PPCA(LatentVariableModel):
    r"""PPCA as a Pyro model with an amortized guide that can be exact.

    ``decoder = nn.Linear(latent_dim, data_dim)`` holds :math:`W` (its weight) and
    :math:`\mu` (its bias); the likelihood is a :class:`GaussianLikelihood` with one
    learned global scale :math:`\sigma`. The guide is

    .. math::

        q(z \mid x) = \mathcal N(A x + b,\ L L^\top),

    a linear encoder for the mean and one learned lower-triangular Cholesky factor
    :math:`L` (positive diagonal through ``exp``). The exact posterior has exactly this form
    (mean linear in :math:`x`, covariance independent of :math:`x`, generally not diagonal),
    so SVI can close the ELBO gap and reach the exact likelihood; a diagonal guide could
    only do so at a rotation of :math:`W` that diagonalises :math:`W^\top W`.

    Train it by SVI (:class:`pyro_lvm.infer.ModuleSVI` on ``model``/``guide``), by gradient
    descent on :meth:`exact_log_likelihood` (:class:`pyro_lvm.infer.MarginalLikelihoodGD`),
    or set it directly with :meth:`fit_closed_form` / :meth:`fit_em`.

    Parameters
    ----------
    data_dim, latent_dim : int
        :math:`D` and :math:`q`.
    likelihood : GaussianLikelihood, optional
        Must have one learned global scale (default ``GaussianLikelihood()``).
    """

    def __init__(
        self, data_dim: int, latent_dim: int, likelihood: GaussianLikelihood | None = None
    ):
        likelihood = likelihood if likelihood is not None else GaussianLikelihood()
        if not (
            isinstance(likelihood, GaussianLikelihood)
            and isinstance(likelihood.log_scale, nn.Parameter)
            and likelihood.log_scale.numel() == 1
        ):
            raise ValueError(
                "PPCA needs a Gaussian likelihood with one learned global scale; pass "
                "GaussianLikelihood(learn_scale=True) (CLI: --likelihood gaussian)"
            )
        if data_dim > 0 and latent_dim >= data_dim:
            raise ValueError(
                f"PPCA latent_dim must be smaller than data_dim = {data_dim}, got {latent_dim}"
            )
        super().__init__(data_dim, latent_dim, nn.Linear(latent_dim, data_dim), likelihood)
        self.encoder = nn.Linear(data_dim, latent_dim)
        # unconstrained Cholesky factor: strict lower triangle as is, diagonal = exp(.)
        self.guide_tril = nn.Parameter(torch.zeros(latent_dim, latent_dim))

    # -- parameters ----------------------------------------------------------------------
    def params(self) -> PPCAParams:
        """Current :class:`PPCAParams` (differentiable views of the module parameters)."""
        return PPCAParams(
            self.decoder.weight, self.decoder.bias, (2 * self.likelihood.log_scale).exp()[0]
        )

    def guide_scale_tril(self) -> torch.Tensor:
        """The guide's Cholesky factor :math:`L` (lower triangular, positive diagonal)."""
        raw = self.guide_tril
        return raw.tril(-1) + torch.diag_embed(raw.diagonal().exp())

    @torch.no_grad()
    def set_params(self, params: PPCAParams) -> None:
        """Set decoder and noise to ``params`` and the guide to their exact posterior."""
        W, mu, sigma2 = (torch.as_tensor(p).to(self.decoder.weight) for p in params)
        if W.shape != (self.data_dim, self.latent_dim):
            raise ValueError(
                f"W must have shape {(self.data_dim, self.latent_dim)}, got {tuple(W.shape)}"
            )
        self.decoder.weight.copy_(W)
        self.decoder.bias.copy_(mu)
        self.likelihood.log_scale.fill_(0.5 * float(sigma2.log()))
        params = self.params()
        L = _cholesky_M(params)
        gain = torch.cholesky_solve(params.W.T, L)  # M^{-1} W^T, (q, D)
        self.encoder.weight.copy_(gain)
        self.encoder.bias.copy_(-gain @ params.mu)
        chol = torch.linalg.cholesky(params.sigma2 * torch.cholesky_inverse(L))
        self.guide_tril.copy_(chol.tril(-1) + torch.diag_embed(chol.diagonal().log()))

    def fit_closed_form(self, x: torch.Tensor) -> PPCA:
        """Set the maximum-likelihood parameters (:func:`ppca_mle`) and the exact guide."""
        self.check_data(x)
        self.set_params(ppca_mle(x, self.latent_dim))
        return self

    def fit_em(self, x: torch.Tensor, num_iters: int, **kwargs) -> PPCA:
        """Run :func:`ppca_em` (``kwargs`` passed on) and set the result and the exact guide."""
        self.check_data(x)
        self.set_params(ppca_em(x, self.latent_dim, num_iters, **kwargs))
        return self

    # -- exact quantities ----------------------------------------------------------------
    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact :math:`\\log p(x)` per datapoint, shape ``(N,)`` (differentiable)."""
        return ppca_log_likelihood(x, self.params())

    def exact_posterior(self, x: torch.Tensor) -> dist.Distribution:
        """The exact :math:`p(z \\mid x)` as a batch of multivariate normals."""
        mean, cov = ppca_posterior(x, self.params())
        return dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(cov))

    def exact_guide(self, x: torch.Tensor) -> None:
        """Pyro guide sampling the exact posterior (ELBO and IWAE then equal log p(x))."""
        self.register()
        with pyro.plate("data", x.shape[0]):
            pyro.sample(self.latent_site, self.exact_posterior(x))

    # -- amortized guide -----------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        r""":math:`q(z \mid x) = \mathcal N(A x + b, L L^\top)`, one event dim."""
        return dist.MultivariateNormal(self.encoder(x), scale_tril=self.guide_scale_tril())

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Exact posterior mean :math:`M^{-1} W^\\top (x - \\mu)`."""
        return ppca_posterior(x, self.params())[0]
