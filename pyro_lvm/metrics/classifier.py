r"""A small classifier whose hidden features define the sample-quality metric.

FID embeds images with an ImageNet-trained Inception-v3, which needs a download and does
not fit 8x8 digits. Here the feature network is an MLP that pyro_lvm trains itself on the
labelled training split of the same dataset, in the same data representation as the
models' samples (``prepare_for_likelihood``: ``[0, 1]`` intensities, or the 8-bit grid in
``[-1, 1]`` for ``logistic``). Its penultimate activations (after the last ReLU) are the
features. Training is seeded, so the classifier, and therefore the metric, is a
deterministic function of the dataset, representation and settings; it is cached on disk
(:func:`feature_classifier`) so every model of a comparison is judged by the same network.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "DEFAULT_SETTINGS",
    "ClassifierSettings",
    "FeatureClassifier",
    "feature_classifier",
    "train_classifier",
]


class ClassifierSettings(NamedTuple):
    """How the feature classifier is trained (all part of its cache key).

    Attributes
    ----------
    hidden_dim : int
        Width of both hidden layers (the feature dimension).
    epochs : int
        Passes over the training split (Adam, learning rate ``lr``, minibatch ``batch_size``).
    lr : float
    batch_size : int
    seed : int
        Seed of the initialisation and minibatch order.
    """

    hidden_dim: int = 64
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0


#: the settings every pyro_lvm comparison uses
DEFAULT_SETTINGS = ClassifierSettings()


class FeatureClassifier(nn.Module):
    """``data_dim -> hidden -> hidden -> num_classes`` MLP; :meth:`features` is the
    second hidden layer's activations."""

    def __init__(self, data_dim: int, num_classes: int, hidden_dim: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(data_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Penultimate activations ``(N, hidden_dim)`` of ``x`` ``(N, data_dim)``."""
        was_training = self.training
        self.eval()
        out = torch.cat([self.trunk(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        self.train(was_training)
        return out


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, settings: ClassifierSettings = DEFAULT_SETTINGS
) -> FeatureClassifier:
    """Fit a :class:`FeatureClassifier` to labelled data ``x`` ``(N, D)``, ``y`` ``(N,)``
    by minimising the cross-entropy (seeded; CPU)."""
    if y is None or len(y) != len(x):
        raise ValueError(
            "the feature classifier needs one integer label per training example; "
            "this dataset has none (sample quality is only measured for labelled data)"
        )
    y = torch.as_tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng():  # never disturb the caller's generators
        torch.manual_seed(settings.seed)
        net = FeatureClassifier(x.shape[1], int(y.max()) + 1, settings.hidden_dim)
    optim = torch.optim.Adam(net.parameters(), lr=settings.lr)
    for _ in range(settings.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(settings.batch_size):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
    return net.eval()


def _cache_name(name: str, x: torch.Tensor, y: torch.Tensor, settings: ClassifierSettings) -> str:
    # the key covers the data themselves, so a changed split or representation retrains
    digest = hashlib.sha256()
    digest.update(x.detach().cpu().double().numpy().tobytes())
    digest.update(torch.as_tensor(y).cpu().numpy().tobytes())
    digest.update(json.dumps(settings._asdict(), sort_keys=True).encode())
    return f"frechet_classifier-{name}-{digest.hexdigest()[:12]}.pt"


def feature_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    cache_dir: str | Path | None,
    name: str = "data",
    settings: ClassifierSettings = DEFAULT_SETTINGS,
) -> FeatureClassifier:
    """The classifier for training data ``(x, y)``: loaded from ``cache_dir`` if trained
    before with the same data and settings, else trained and saved there.

    Parameters
    ----------
    x, y : Tensor
        Labelled training data, in the representation the models generate.
    cache_dir : path or None
        Folder for ``frechet_classifier-NAME-HASH.pt`` (e.g. the data dir); ``None``
        trains without caching.
    name : str
        Readable part of the file name (the dataset and representation).
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / _cache_name(name, x, y, settings)
        if path.is_file():
            net = _load_cached(path, x.shape[1], settings)
            if net is not None:
                return net
    net = train_classifier(x, y, settings)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"num_classes": net.head.out_features, "state_dict": net.state_dict()}, tmp)
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return net


def _load_cached(
    path: Path, data_dim: int, settings: ClassifierSettings
) -> FeatureClassifier | None:
    """The cached classifier, or ``None`` (with a one-line warning) when the file is
    damaged, truncated or not a classifier's: it is derived data, retrained and
    replaced. Loading is ``weights_only``, so a planted file runs no code."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = FeatureClassifier(data_dim, int(saved["num_classes"]), settings.hidden_dim)
        net.load_state_dict(saved["state_dict"])
    except Exception as err:  # any unreadable cache: retrain (the file is only a cache)
        kind = type(err).__name__
        warnings.warn(
            f"{path} is not a usable classifier cache ({kind}); retraining it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return net.eval()
