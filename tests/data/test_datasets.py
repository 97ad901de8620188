import pickle
import struct

import numpy as np
import pytest
import torch

from pyro_lvm.data import (
    DataBundle,
    binarize,
    binary_latent_data,
    binary_latent_log_likelihood,
    load_dataset,
    load_digits,
    ppca_data,
    to_8bit_symmetric,
)


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.test_x, b.test_x)
    assert (a.num_train, a.num_test, a.data_dim) == (1500, 297, 64)
    assert 0 <= a.train_x.min() and a.train_x.max() == 1
    train_rows = {tuple(r.tolist()) for r in a.train_x}
    dup = sum(tuple(r.tolist()) in train_rows for r in a.test_x)
    assert dup < 10  # digits has a handful of exact duplicate images, not a leaked split


def test_bernoulli_eval_binarization_is_fixed_seed():
    d = load_digits()
    b1, b2 = d.for_likelihood("bernoulli"), d.for_likelihood("bernoulli")
    assert torch.equal(b1.test_x, b2.test_x)
    assert set(b1.test_x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(b1.train_x, d.train_x)  # training data binarized per batch instead
    assert b1.binary_probs


def test_binarize_mean_and_seed():
    p = torch.full((20000,), 0.3)
    assert abs(binarize(p).mean().item() - 0.3) < 4 * (0.3 * 0.7 / 20000) ** 0.5
    assert torch.equal(binarize(p, seed=3), binarize(p, seed=3))


def test_8bit_symmetric_grid():
    x = torch.tensor([0.0, 1.0, 0.5, 1 / 255])
    y = to_8bit_symmetric(x)
    assert torch.allclose(y, torch.tensor([-1.0, 1.0, 2 * 128 / 255 - 1, -1 + 2 / 255]), atol=1e-6)
    logistic = load_digits().for_likelihood("logistic")
    k = (logistic.train_x + 1) * 255 / 2
    assert torch.allclose(k, k.round(), atol=1e-4)


def _write_idx(path, arr, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for s in arr.shape:
            f.write(struct.pack(">I", s))
        f.write(arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_layout_from_local_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), 2049)
    d = load_dataset(name, tmp_path)
    assert (d.num_train, d.num_test, d.data_dim, d.image_shape) == (6, 4, 784, (1, 28, 28))
    assert 0 <= d.train_x.min() and d.train_x.max() <= 1


def test_cifar10_layout_from_local_files(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8), "labels": [0, 1]}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    # torchvision checks file integrity only when downloading
    d = load_dataset("cifar10", tmp_path)
    assert (d.num_train, d.num_test, d.data_dim) == (10, 2, 3072)


def test_celeba_layout_from_local_files(tmp_path):
    from PIL import Image

    img_dir = tmp_path / "celeba" / "img_align_celeba"
    img_dir.mkdir(parents=True)
    lines = []
    for i in range(5):
        Image.fromarray(np.full((218, 178, 3), 40 * i, dtype=np.uint8)).save(img_dir / f"{i}.jpg")
        lines.append(f"{i}.jpg {0 if i < 3 else 2}")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines))
    d = load_dataset("celeba", tmp_path)
    assert (d.num_train, d.num_test, d.data_dim) == (3, 2, 3 * 32 * 32)


def test_svhn_layout_from_local_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        savemat(
            tmp_path / f"{split}_32x32.mat",
            {"X": rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8), "y": np.ones((n, 1))},
        )
    d = load_dataset("svhn", tmp_path)
    assert (d.num_train, d.num_test, d.data_dim) == (3, 2, 3072)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "svhn", "celeba"])
def test_missing_dataset_names_the_flag(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="--data-dir.*--download"):
        load_dataset(name, tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_user_tensors_and_loaders():
    x = torch.rand(50, 3, 4)
    y = torch.arange(50)
    d = DataBundle.from_tensors(x, train_y=y)
    assert d.num_train + d.num_test == 50 and d.data_dim == 12
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    d2 = DataBundle.from_loaders(loader, loader)
    assert d2.num_train == 50 and d2.train_y is not None


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), "NaN or infinite"),
        (torch.zeros(0, 4), "empty"),
        (torch.zeros(5), "shape"),
    ],
)
def test_bad_user_data(bad, match):
    with pytest.raises(ValueError, match=match):
        DataBundle("bad", bad, torch.zeros(1, 2))


def test_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        DataBundle.from_loaders([])


def test_bernoulli_needs_unit_interval():
    bundle, _ = ppca_data(50, 4, 1)
    with pytest.raises(ValueError, match=r"\[0, 1\].*--likelihood gaussian"):
        bundle.for_likelihood("bernoulli")


def test_ppca_data_covariance(float64):
    bundle, truth = ppca_data(num=20000, data_dim=3, latent_dim=1, noise_std=0.5, seed=1)
    W, s = truth.params["W"], truth.params["sigma"]
    cov = torch.cov(bundle.train_x.T)
    expected = W @ W.T + s**2 * torch.eye(3)
    # sample covariance entries have standard error about sqrt((S_ii S_jj + S_ij^2) / n)
    se = ((expected.diag()[:, None] * expected.diag()[None] + expected**2) / 16000).sqrt()
    assert ((cov - expected).abs() < 5 * se).all()


def test_binary_latent_loglik_normalised(float64):
    _, truth = binary_latent_data(num=10, data_dim=3, latent_dim=2)
    import itertools

    xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
    total = binary_latent_log_likelihood(xs, truth.params).logsumexp(0)
    assert abs(total.item()) < 1e-10


def test_data_knows_no_model():
    """Layering: importing the data layer loads no model code (DESIGN.md, data flow)."""
    import subprocess
    import sys

    code = (
        "import sys, pyro_lvm.data;"
        "bad = [m for m in sys.modules if m.startswith(('pyro_lvm.models', 'pyro_lvm.infer'))];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_for_likelihood_takes_the_likelihood_object_or_its_name():
    from pyro_lvm.models.likelihoods import LIKELIHOODS

    d = load_digits()
    for name, cls in LIKELIHOODS.items():
        by_obj, by_name = d.for_likelihood(cls()), d.for_likelihood(name)
        assert torch.equal(by_obj.train_x, by_name.train_x)
        assert torch.equal(by_obj.test_x, by_name.test_x)
        assert by_obj.binary_probs == (name == "bernoulli")
    with pytest.raises(ValueError, match="unknown data format 'poisson'; choose one of"):
        d.for_likelihood("poisson")
