r"""The Frechet distance between Gaussians fitted to two sets of features.

For feature means and covariances :math:`(\mu_1, \Sigma_1)` and :math:`(\mu_2, \Sigma_2)`,

.. math::

    d^2 = \lVert \mu_1 - \mu_2 \rVert^2
          + \operatorname{tr}\bigl(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\bigr),

the squared 2-Wasserstein distance between :math:`\mathcal N(\mu_1, \Sigma_1)` and
:math:`\mathcal N(\mu_2, \Sigma_2)` (Dowson & Landau 1982), as in FID (Heusel et al.
2017). The trace of the matrix square root comes from symmetric eigendecompositions
(:func:`frechet_distance`); torchmetrics' and torch-fidelity's FID code is built around
image tensors and Inception features, so the three-line formula is written here instead.
The estimate from finite samples is biased upwards: for two samples of one distribution
the mean term alone has expectation :math:`\operatorname{tr}\Sigma/n_1 +
\operatorname{tr}\Sigma/n_2`, so compare models with the same number of samples.

References
----------
Dowson, Landau (1982), "The Frechet distance between multivariate normal distributions",
J. Multivariate Analysis.
Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter (2017), "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "sample_frechet_distance",
]


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` of ``features`` ``(N, F)``, float64."""
    f = torch.as_tensor(features).detach().cpu().double().numpy()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, F), got {tuple(f.shape)}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    r"""Squared Frechet distance :math:`d^2` between two Gaussians (see the module).

    The trace term uses :math:`\operatorname{tr}(\Sigma_1\Sigma_2)^{1/2} =
    \operatorname{tr}(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2})^{1/2}` (the two matrices are
    similar), whose argument is symmetric positive semi-definite: two symmetric
    eigendecompositions, exact for singular covariances (dead ReLU features) where a general
    ``sqrtm`` of the non-symmetric product needs a ridge and drops an imaginary part.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, covariances "
            f"{sigma1.shape} vs {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    cross = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root
    return float(max(d2, 0.0))  # >= 0 exactly; clip round-off below zero


def frechet_distance_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`frechet_distance` between Gaussians fitted to features ``a`` and ``b``."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


@torch.no_grad()
def sample_frechet_distance(
    model, reference_x: torch.Tensor, classifier, num_samples: int | None = None
) -> float:
    """Frechet distance between the classifier features of ``model.generate`` samples and
    of ``reference_x`` (e.g. the test split); not FID (see :mod:`pyro_lvm.metrics`).

    Parameters
    ----------
    model
        Anything with ``generate(num) -> (num, D)`` (every pyro_lvm model: likelihood means
        of prior draws), in the same data representation as ``reference_x``.
    reference_x : Tensor
        Real data ``(N, D)``.
    classifier : FeatureClassifier
        Feature network (:func:`~pyro_lvm.metrics.feature_classifier`).
    num_samples : int, optional
        Number of model samples (default ``N``, so both sides have the same bias).
    """
    num = num_samples or reference_x.shape[0]
    device = next(classifier.parameters()).device
    samples = model.generate(num).to(device)
    return frechet_distance_from_features(
        classifier.features(samples), classifier.features(reference_x.to(device))
    )
