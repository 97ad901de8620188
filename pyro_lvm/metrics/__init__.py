"""Sample-quality metrics that need no download.

:func:`frechet_distance` is the Frechet (2-Wasserstein) distance between two Gaussians;
:func:`sample_frechet_distance` applies it in the feature space of a small classifier that
pyro_lvm trains on the same dataset and caches on disk (:func:`feature_classifier`). That
makes it a *Frechet classifier distance*, the FID recipe with a home-made feature network:
comparable between models on one dataset and classifier, not with published FID numbers
(which use Inception-v3 features of ImageNet-trained weights).
"""

from pyro_lvm.metrics.classifier import (
    ClassifierSettings,
    FeatureClassifier,
    feature_classifier,
    train_classifier,
)
from pyro_lvm.metrics.frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    sample_frechet_distance,
)

__all__ = [
    "ClassifierSettings",
    "FeatureClassifier",
    "feature_classifier",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "sample_frechet_distance",
    "train_classifier",
]
