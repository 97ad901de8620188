"""Named datasets: the embedded digits default and torchvision's image datasets.

``digits`` (scikit-learn's 1797 8x8 images, 17 grey levels) ships with scikit-learn and is
split with a fixed seed. The others are read from torchvision's folder layout under
``data_dir`` and downloaded only when ``download=True`` (``--download``):

=============== ================================================
name            expected under ``data_dir``
=============== ================================================
mnist           ``MNIST/raw/train-images-idx3-ubyte`` (+ labels, t10k)
fashion-mnist   ``FashionMNIST/raw/train-images-idx3-ubyte`` (...)
cifar10         ``cifar-10-batches-py/data_batch_1`` ... ``test_batch``
svhn            ``train_32x32.mat``, ``test_32x32.mat``
celeba          ``celeba/img_align_celeba/*.jpg``, ``celeba/list_eval_partition.txt``
=============== ================================================

Intensities are scaled to [0, 1]; :meth:`DataBundle.for_likelihood` maps them to what a
likelihood needs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from pyro_lvm.data.bundle import DataBundle

__all__ = ["DATASETS", "load_dataset", "load_digits"]

DIGITS_TEST_SIZE = 297
DIGITS_SPLIT_SEED = 0


def load_digits() -> DataBundle:
    """scikit-learn's digits in [0, 1] (pixel / 16), 1500 train / 297 test, fixed split."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.as_tensor(data.data / 16.0, dtype=torch.get_default_dtype())
    y = torch.as_tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test, train = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    return DataBundle("digits", x[train], x[test], y[train], y[test], image_shape=(1, 8, 8))


def _missing(name: str, root: Path, expected: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r} not found: expected {root / expected}; pass --data-dir DIR "
        "pointing at it, or add --download to fetch it"
    )


def _torchvision_mnist(cls_name: str, folder: str, name: str, root: Path, download: bool):
    import torchvision

    if not download and not (root / folder / "raw" / "train-images-idx3-ubyte").exists():
        raise _missing(name, root, f"{folder}/raw/train-images-idx3-ubyte")
    cls = getattr(torchvision.datasets, cls_name)
    splits = [cls(str(root), train=train, download=download) for train in (True, False)]
    (tr, te) = splits
    return DataBundle(
        name,
        tr.data.float() / 255.0,
        te.data.float() / 255.0,
        tr.targets.long(),
        te.targets.long(),
        image_shape=(1, 28, 28),
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only NumPy arrays and builtin containers: a planted pickle in a data
    folder (which a ``config.json`` can point to) cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        if str(err).startswith("refusing"):
            raise ValueError(f"{path} is not a CIFAR-10 batch ({err}); replace the file") from None
        raise ValueError(
            f"{path} is damaged or truncated ({err}); delete it and pass --download, or copy "
            "it again"
        ) from None
    except (EOFError, ValueError, TypeError) as err:
        raise ValueError(
            f"{path} is damaged or truncated ({type(err).__name__}); delete it and pass "
            "--download, or copy it again"
        ) from None
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch (no data/labels); replace the file")
    return batch


def _cifar10(root: Path, download: bool) -> DataBundle:
    """CIFAR-10 from the python pickles (read directly: torchvision re-checks checksums),
    through an unpickler that rebuilds nothing but arrays."""
    base = root / "cifar-10-batches-py"
    if download and not (base / "test_batch").exists():
        import torchvision

        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    if not (base / "data_batch_1").exists():
        raise _missing("cifar10", root, "cifar-10-batches-py/data_batch_1")

    def read(names):
        xs, ys = [], []
        for name in names:
            batch = _read_cifar_batch(base / name)
            xs.append(torch.as_tensor(np.asarray(batch["data"], dtype=np.uint8)))
            ys.append(torch.as_tensor(batch["labels"]))
        return torch.cat(xs).float() / 255.0, torch.cat(ys).long()

    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    return DataBundle("cifar10", train_x, test_x, train_y, test_y, image_shape=(3, 32, 32))


def _svhn(root: Path, download: bool) -> DataBundle:
    """SVHN cropped digits from ``{train,test}_32x32.mat``."""
    from scipy.io import loadmat

    if download:
        import torchvision

        for split in ("train", "test"):
            if not (root / f"{split}_32x32.mat").exists():
                torchvision.datasets.SVHN(str(root), split=split, download=True)
    if not (root / "train_32x32.mat").exists():
        raise _missing("svhn", root, "train_32x32.mat")

    def read(split):
        mat = loadmat(root / f"{split}_32x32.mat")
        x = torch.as_tensor(mat["X"]).permute(3, 2, 0, 1)  # (H, W, C, N) -> (N, C, H, W)
        y = torch.as_tensor(mat["y"].astype(np.int64)).reshape(-1) % 10  # label 10 is digit 0
        return x.float() / 255.0, y

    train_x, train_y = read("train")
    test_x, test_y = read("test")
    return DataBundle("svhn", train_x, test_x, train_y, test_y, image_shape=(3, 32, 32))


def _celeba(root: Path, download: bool, size: int = 32) -> DataBundle:
    """CelebA aligned faces, centre-cropped to 140 px and resized to ``size`` (as in the
    LAE paper's preprocessing). Read directly so small local copies work without
    torchvision's checksum files."""
    from PIL import Image

    base = root / "celeba"
    if download and not (base / "list_eval_partition.txt").exists():
        import torchvision

        torchvision.datasets.CelebA(str(root), split="all", download=True)
    partition = base / "list_eval_partition.txt"
    if not partition.exists():
        raise _missing("celeba", root, "celeba/list_eval_partition.txt")
    splits: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    for line in partition.read_text().split("\n"):
        if not line.strip():
            continue
        fname, split = line.split()
        img = Image.open(base / "img_align_celeba" / fname).convert("RGB")
        w, h = img.size
        c = min(140, w, h)
        left, top = (w - c) // 2, (h - c) // 2
        img = img.crop((left, top, left + c, top + c)).resize((size, size), Image.BILINEAR)
        arr = torch.as_tensor(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        splits[int(split)].append(arr)
    if not splits[0] or not (splits[2] or splits[1]):
        raise ValueError(f"celeba partition file {partition} lists no train or no test images")
    test = splits[2] or splits[1]
    return DataBundle(
        "celeba", torch.stack(splits[0]), torch.stack(test), image_shape=(3, size, size)
    )


DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn", "celeba")


def load_dataset(
    name: str = "digits", data_dir: str | Path = "data", download: bool = False
) -> DataBundle:
    """Load a named dataset as a :class:`DataBundle` with intensities in [0, 1].

    Raises
    ------
    FileNotFoundError
        The dataset is not under ``data_dir`` and ``download`` is false (the message says
        which flag to pass).
    ValueError
        A file is damaged, truncated or not what it claims to be, or ``download`` failed
        (one line naming the file or dataset and the fix).
    """
    root = Path(data_dir).expanduser()
    if name == "digits":
        return load_digits()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    try:
        return _LOADERS[name](root, download)
    except (FileNotFoundError, ValueError):
        raise
    except (RuntimeError, OSError, EOFError, IndexError, KeyError, AssertionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if isinstance(err, (AssertionError, KeyError)):  # torchvision checks a file's header
            first = "unexpected file contents"
        if download:
            raise ValueError(
                f"could not download {name} into {root} ({first}); without network access, "
                f"place the files under {root} yourself (torchvision's folder layout)"
            ) from None
        raise ValueError(
            f"could not read {name} from {root} ({first}): a file is damaged or truncated; "
            "delete it and pass --download, or copy it again"
        ) from None


_LOADERS = {
    "mnist": lambda root, download: _torchvision_mnist("MNIST", "MNIST", "mnist", root, download),
    "fashion-mnist": lambda root, download: _torchvision_mnist(
        "FashionMNIST", "FashionMNIST", "fashion-mnist", root, download
    ),
    "cifar10": lambda root, download: _cifar10(root, download),
    "svhn": lambda root, download: _svhn(root, download),
    "celeba": lambda root, download: _celeba(root, download),
}
