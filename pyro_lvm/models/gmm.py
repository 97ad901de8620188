r"""Full-covariance Gaussian mixtures: EM fit and the Pyro distribution.

.. math::

    p(z) = \sum_{k=1}^K \pi_k\, \mathcal N(z;\ \mu_k, \Sigma_k),
    \qquad \Sigma_k = L_k L_k^\top .

:func:`fit_gaussian_mixture` runs EM with k-means initialisation through
:class:`sklearn.mixture.GaussianMixture` (a dependency of pyro_lvm already: mature, tested
and maintained, with k-means++ starts, restarts and covariance regularisation; a
hand-written torch EM would duplicate it with fewer safeguards). Two things are added:

- the data are standardised per dimension before EM and the result mapped back, so the
  covariance floor ``reg_covar`` is *relative* to each dimension's variance (autoencoder
  codes have an arbitrary scale);
- the random state comes from torch's global generator, so ``torch.manual_seed`` (the
  CLI's ``--seed``) makes the fit deterministic, and a non-converged fit is reported in
  :class:`GaussianMixtureInfo` instead of a warning.

:func:`gaussian_mixture` turns the parameters into a
:class:`pyro.distributions.MixtureSameFamily` of
:class:`~pyro.distributions.MultivariateNormal` components (event shape ``(Z,)``).

References
----------
Dempster, Laird, Rubin (1977), "Maximum likelihood from incomplete data via the EM
algorithm", JRSS B 39(1).
Bishop (2006), "Pattern Recognition and Machine Learning", section 9.2.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import pyro.distributions as dist
import torch
from torch.distributions import constraints

__all__ = [
    "GaussianMixtureInfo",
    "GaussianMixtureParams",
    "fit_gaussian_mixture",
    "gaussian_mixture",
]


class GaussianMixtureParams(NamedTuple):
    """Parameters of a ``K``-component mixture in ``Z`` dimensions.

    Attributes
    ----------
    logits : Tensor
        Log mixture weights :math:`\\log \\pi_k`, shape ``(K,)`` (normalised).
    loc : Tensor
        Means :math:`\\mu_k`, shape ``(K, Z)``.
    scale_tril : Tensor
        Cholesky factors :math:`L_k` of the covariances, shape ``(K, Z, Z)``.
    """

    logits: torch.Tensor
    loc: torch.Tensor
    scale_tril: torch.Tensor


class GaussianMixtureInfo(NamedTuple):
    """Diagnostics of an EM fit.

    Attributes
    ----------
    mean_log_likelihood : float
        Average :math:`\\log p(z_n)` of the fitted data under the fitted mixture (nats).
    converged : bool
        Whether EM met its tolerance within ``max_iter`` iterations.
    num_iters : int
        EM iterations of the best restart.
    """

    mean_log_likelihood: float
    converged: bool
    num_iters: int


class _GaussianMixture(dist.MixtureSameFamily):
    """:class:`~pyro.distributions.MixtureSameFamily` whose support is its components'
    (``real_vector``) rather than an opaque wrapper, so samplers that require real-valued
    latents (AIS, Langevin) accept it."""

    @constraints.dependent_property
    def support(self):
        return self.component_distribution.support


def gaussian_mixture(params: GaussianMixtureParams) -> dist.MixtureSameFamily:
    """The mixture as a distribution with batch shape ``()`` and event shape ``(Z,)``."""
    return _GaussianMixture(
        dist.Categorical(logits=params.logits),
        dist.MultivariateNormal(params.loc, scale_tril=params.scale_tril),
    )


def fit_gaussian_mixture(
    z: torch.Tensor,
    num_components: int,
    *,
    reg_covar: float = 1e-6,
    max_iter: int = 500,
    tol: float = 1e-4,
    num_restarts: int = 1,
) -> tuple[GaussianMixtureParams, GaussianMixtureInfo]:
    r"""Maximum-likelihood full-covariance mixture of ``z`` (shape ``(N, Z)``) by EM.

    Parameters
    ----------
    z : Tensor
        Data, shape ``(N, Z)``, finite.
    num_components : int
        Number of components ``K`` (at most ``N``).
    reg_covar : float
        Added to the diagonal of each covariance of the *standardised* data, i.e. a floor
        of ``reg_covar`` times each dimension's variance.
    max_iter, tol : int, float
        EM stops after ``max_iter`` iterations or when the mean log-likelihood gains less
        than ``tol`` (standardised units).
    num_restarts : int
        Independent k-means-initialised EM runs; the best log-likelihood wins.

    Returns
    -------
    (GaussianMixtureParams, GaussianMixtureInfo)
        Parameters in ``z``'s dtype and device, and fit diagnostics.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    if z.dim() != 2:
        raise ValueError(f"a Gaussian mixture needs data of shape (N, Z), got {tuple(z.shape)}")
    if num_components <= 0:
        raise ValueError(
            f"num_components must be a positive integer, got {num_components}; pass e.g. "
            "--num-components 10"
        )
    if z.shape[0] < max(num_components, 2):
        raise ValueError(
            f"cannot fit {num_components} mixture components to {z.shape[0]} points; use "
            "fewer components or more training data"
        )
    if not torch.isfinite(z).all():
        raise ValueError("the points to fit contain NaN or infinite values; check the encoder")
    z64 = z.detach().to("cpu", torch.float64)
    shift = z64.mean(0)
    # a constant dimension has zero spread; any positive unit keeps the maths finite
    unit = z64.std(0).clamp_min(1e-12)
    seed = int(torch.randint(0, 2**31 - 1, ()))  # torch's seed fixes sklearn's
    gm = GaussianMixture(
        num_components,
        covariance_type="full",
        reg_covar=reg_covar,
        max_iter=max_iter,
        tol=tol,
        n_init=num_restarts,
        init_params="kmeans",
        random_state=seed,
    )
    std = ((z64 - shift) / unit).numpy()
    # EM's matrices are (N, K, Z) with small Z: BLAS threads buy little, and on a busy
    # machine their spin-waiting slows a fit down many times over
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # reported through GaussianMixtureInfo.converged instead
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(std)
    weights = torch.as_tensor(gm.weights_, dtype=torch.float64)
    loc = shift + unit * torch.as_tensor(gm.means_, dtype=torch.float64)
    # Sigma = D S D with D = diag(unit): the Cholesky factor is D L
    chol = torch.linalg.cholesky(torch.as_tensor(gm.covariances_, dtype=torch.float64))
    scale_tril = unit.unsqueeze(-1) * chol
    params = GaussianMixtureParams(weights.log(), loc, scale_tril)
    mean_ll = gaussian_mixture(params).log_prob(z64).mean().item()
    info = GaussianMixtureInfo(mean_ll, bool(gm.converged_), int(gm.n_iter_))
    params = GaussianMixtureParams(*(t.to(device=z.device, dtype=z.dtype) for t in params))
    return params, info
