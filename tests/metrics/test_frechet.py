"""Frechet distance: closed forms, and the classifier-feature metric on digits."""

import numpy as np
import pytest
import torch
from seeding import offset_seed

from pyro_lvm.data import load_dataset
from pyro_lvm.metrics import (
    feature_classifier,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
)
from pyro_lvm.metrics.classifier import ClassifierSettings


def _rotation(dim, rng):
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q


def test_frechet_matches_closed_form_for_commuting_covariances():
    # Sigma_i = U diag(a_i) U^T commute: d^2 = |mu1 - mu2|^2 + sum (sqrt a1 - sqrt a2)^2
    rng = np.random.default_rng(offset_seed(0))
    u = _rotation(6, rng)
    a1, a2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    a1[0] = a2[0] = 0.0  # a shared null direction: singular covariances are exact too
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a1) - np.sqrt(a2)) ** 2).sum()
    got = frechet_distance(mu1, u @ np.diag(a1) @ u.T, mu2, u @ np.diag(a2) @ u.T)
    # a zero eigenvalue is recovered as ~1e-16, whose square root is ~1e-8: sqrt(eps)
    assert got == pytest.approx(exact, abs=1e-6)


def test_frechet_of_a_gaussian_with_itself_is_zero_and_mismatch_is_an_error():
    rng = np.random.default_rng(offset_seed(1))
    a = rng.standard_normal((5, 5))
    sigma = a @ a.T
    assert frechet_distance(np.ones(5), sigma, np.ones(5), sigma) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.ones(5), sigma, np.ones(4), sigma[:4, :4])


@pytest.fixture(scope="module")
def digits_features():
    data = load_dataset("digits").for_likelihood("logistic")
    return data, data.train_x, data.train_y


def test_sample_quality_is_zero_on_itself_within_bias_on_halves_and_grows_with_noise(
    tmp_path, digits_features
):
    data, x, y = digits_features
    net = feature_classifier(x, y, tmp_path, "digits-logistic")
    assert len(list(tmp_path.glob("frechet_classifier-digits-logistic-*.pt"))) == 1
    cached = feature_classifier(x, y, tmp_path, "digits-logistic")  # loaded, not retrained
    assert torch.equal(cached.features(data.test_x), net.features(data.test_x))

    gen = torch.Generator().manual_seed(offset_seed(2))
    perm = torch.randperm(len(x), generator=gen)
    a, b = x[perm[: len(x) // 2]], x[perm[len(x) // 2 :]]
    fa = net.features(a)
    assert frechet_distance_from_features(fa, fa) == pytest.approx(0, abs=1e-9)

    # the finite-sample bias: d^2 between two samples of these sizes from one Gaussian
    # (the features' own fit), 20 replicates; two real halves must fall inside it
    mu, sigma = feature_statistics(net.features(x))
    rng = np.random.default_rng(offset_seed(3))
    null = [
        frechet_distance(
            *feature_statistics(torch.as_tensor(rng.multivariate_normal(mu, sigma, len(a)))),
            *feature_statistics(torch.as_tensor(rng.multivariate_normal(mu, sigma, len(b)))),
        )
        for _ in range(20)
    ]
    bound = np.mean(null) + 4 * np.std(null, ddof=1)
    assert frechet_distance_from_features(fa, net.features(b)) < bound

    noise = torch.randn(b.shape, generator=gen)  # one draw, scaled: common random numbers
    scales = [0.1, 0.2, 0.4, 0.8]
    distances = [frechet_distance_from_features(fa, net.features(b + s * noise)) for s in scales]
    assert all(d1 < d2 for d1, d2 in zip(distances, distances[1:])), distances
    assert distances[-1] > bound


@pytest.mark.parametrize("damage", ["truncated", "planted"])
def test_a_damaged_classifier_cache_is_retrained_and_replaced(tmp_path, damage):
    import os

    settings = ClassifierSettings(hidden_dim=8, epochs=1)
    x = torch.rand(40, 6)
    y = torch.arange(40) % 3
    net = feature_classifier(x, y, tmp_path, "toy", settings)
    (path,) = tmp_path.glob("frechet_classifier-toy-*.pt")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:

        class Planted:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'pwned'}",))

        torch.save({"num_classes": 3, "state_dict": Planted()}, path)
    with pytest.warns(RuntimeWarning, match="not a usable classifier cache"):
        again = feature_classifier(x, y, tmp_path, "toy", settings)
    assert not (tmp_path / "pwned").exists()
    assert torch.equal(again.features(x), net.features(x))  # seeded: the same network
    cached = feature_classifier(x, y, tmp_path, "toy", settings)  # the cache is whole again
    assert torch.equal(cached.features(x), net.features(x))
