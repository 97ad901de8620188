"""A dataset split into train and test tensors, ready for a likelihood."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pyro_lvm.data.formats import check_finite, resolve_format, to_8bit_symmetric

__all__ = ["DataBundle", "binarize", "to_8bit_symmetric", "prepare_for_likelihood"]

EVAL_BINARIZATION_SEED = 1234


def binarize(x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """Bernoulli draws with probabilities ``x`` (in [0, 1]); ``seed`` fixes the draw.

    Dynamic binarization (a fresh draw per minibatch) for training; a fixed-seed draw for
    evaluation, so test numbers are comparable across runs.
    """
    if seed is None:
        return torch.bernoulli(x)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.bernoulli(x.cpu(), generator=gen).to(x.device)


def prepare_for_likelihood(x: torch.Tensor, likelihood) -> torch.Tensor:
    """Intensities in [0, 1] -> the data a likelihood expects (its :class:`DataFormat`;
    ``likelihood`` may be a likelihood, a format or a name)."""
    return resolve_format(likelihood).prepare(x)


@dataclass
class DataBundle:
    """Train/test tensors of flattened datapoints in ``[0, 1]`` (or real-valued).

    Attributes
    ----------
    name : str
        Dataset name.
    train_x, test_x : Tensor
        Shape ``(N, D)``, float.
    train_y, test_y : Tensor or None
        Integer labels (for coloured latent scatter plots).
    image_shape : tuple or None
        ``(C, H, W)`` when the data are images.
    binary_probs : bool
        Whether ``x`` holds intensities in [0, 1] that are binarized for a Bernoulli
        likelihood (dynamically in training, with a fixed seed for evaluation).
    """

    name: str
    train_x: torch.Tensor
    test_x: torch.Tensor
    train_y: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    image_shape: tuple[int, ...] | None = None
    binary_probs: bool = True

    def __post_init__(self):
        for split in ("train", "test"):
            x = getattr(self, f"{split}_x")
            if not isinstance(x, torch.Tensor):
                x = torch.as_tensor(x)
            if x.dim() < 2:
                raise ValueError(
                    f"{split} data must have shape (num_examples, ...), got {tuple(x.shape)}"
                )
            if x.shape[0] == 0:
                raise ValueError(f"the {split} split of {self.name!r} is empty; provide data")
            x = x.reshape(x.shape[0], -1).to(torch.get_default_dtype())
            check_finite(x, f"{split} data of {self.name!r}")
            setattr(self, f"{split}_x", x)
        if self.train_x.shape[1] != self.test_x.shape[1]:
            raise ValueError(
                f"train and test data have different dimensions ({self.train_x.shape[1]} vs "
                f"{self.test_x.shape[1]}); flatten both the same way"
            )
        if self.image_shape is not None and _prod(self.image_shape) != self.data_dim:
            raise ValueError(f"image_shape {self.image_shape} does not match {self.data_dim} dims")

    @property
    def data_dim(self) -> int:
        return self.train_x.shape[1]

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def num_test(self) -> int:
        return self.test_x.shape[0]

    def for_likelihood(self, likelihood) -> DataBundle:
        """The bundle mapped to what ``likelihood`` reads (its ``data_format``, see
        :mod:`pyro_lvm.data.formats`; a likelihood object or class, a
        :class:`~pyro_lvm.data.formats.DataFormat`, or a name such as ``"bernoulli"``).
        For binary data the test split is binarized once with a fixed seed."""
        fmt = resolve_format(likelihood)
        in_unit = self.train_x.min() >= 0 and self.train_x.max() <= 1
        if fmt.unit_interval and not in_unit:
            what = likelihood if isinstance(likelihood, str) else f"{fmt.name} data"
            raise ValueError(
                f"{what} likelihood needs data in [0, 1] but {self.name!r} spans "
                f"[{float(self.train_x.min()):.3g}, {float(self.train_x.max()):.3g}]; "
                "rescale it or use --likelihood gaussian"
            )
        test_x = (
            binarize(self.test_x, seed=EVAL_BINARIZATION_SEED) if fmt.binarize else self.test_x
        )
        return DataBundle(
            name=self.name,
            train_x=fmt.prepare(self.train_x),
            test_x=fmt.prepare(test_x),
            train_y=self.train_y,
            test_y=self.test_y,
            image_shape=self.image_shape,
            binary_probs=fmt.binarize,
        )

    def holdout(self, num: int, seed: int = 0) -> tuple[DataBundle, torch.Tensor]:
        """Split ``num`` rows off the training set as a validation set.

        The rows are a fixed-seed random subset (the same for every model and run with
        the same ``seed``); for Bernoulli data they are binarized once with a fixed seed,
        like the test split. Returns the reduced bundle and the validation data.
        """
        if not 0 < num < self.num_train:
            raise ValueError(
                f"--validation must be between 1 and {self.num_train - 1} (the training set "
                f"has {self.num_train} examples), got {num}"
            )
        order = torch.randperm(self.num_train, generator=torch.Generator().manual_seed(seed))
        keep, held = order[:-num].sort().values, order[-num:].sort().values
        val_x = self.train_x[held]
        if self.binary_probs:
            val_x = binarize(val_x, seed=EVAL_BINARIZATION_SEED + 1)
        reduced = dataclasses.replace(
            self,
            train_x=self.train_x[keep],
            train_y=None if self.train_y is None else self.train_y[keep],
        )
        return reduced, val_x

    @classmethod
    def from_tensors(
        cls,
        train_x: torch.Tensor,
        test_x: torch.Tensor | None = None,
        train_y: torch.Tensor | None = None,
        test_y: torch.Tensor | None = None,
        name: str = "tensor",
        image_shape: tuple[int, ...] | None = None,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> DataBundle:
        """Wrap user tensors; without ``test_x``, hold out a seeded ``test_fraction``."""
        train_x = torch.as_tensor(train_x)
        if test_x is None:
            n = train_x.shape[0]
            if n < 2:
                raise ValueError(f"need at least 2 examples to split off a test set, got {n}")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            n_test = max(1, int(round(test_fraction * n)))
            test_idx, train_idx = perm[:n_test], perm[n_test:]
            test_x, train_x = train_x[test_idx], train_x[train_idx]
            if train_y is not None:
                train_y = torch.as_tensor(train_y)
                test_y, train_y = train_y[test_idx], train_y[train_idx]
        return cls(name, train_x, torch.as_tensor(test_x), train_y, test_y, image_shape)

    @classmethod
    def from_loaders(
        cls, train: Iterable, test: Iterable | None = None, name: str = "loader", **kwargs
    ) -> DataBundle:
        """Collect a user's ``DataLoader``s (batches ``x`` or ``(x, y, ...)``) into tensors."""
        train_x, train_y = _collect(train)
        test_x, test_y = _collect(test) if test is not None else (None, None)
        return cls.from_tensors(train_x, test_x, train_y, test_y, name=name, **kwargs)


def _collect(loader: Iterable) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys = [], []
    for batch in loader:
        if isinstance(batch, (tuple, list)):
            xs.append(torch.as_tensor(batch[0]))
            if len(batch) > 1:
                ys.append(torch.as_tensor(batch[1]))
        else:
            xs.append(torch.as_tensor(batch))
    if not xs:
        raise ValueError("the DataLoader yielded no batches; check the dataset is not empty")
    x = torch.cat([b.reshape(b.shape[0], -1) for b in xs])
    y = torch.cat(ys) if len(ys) == len(xs) else None
    return x, y


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
