r"""Convolutional encoders and decoders for image data (DCGAN-style).

Images arrive flattened, ``(..., C*H*W)``, as everywhere in pyro_lvm; the networks reshape
them to ``(N, C, H, W)`` internally and accept any batch dimensions to the left
(vectorized particles), so they drop into every model in place of an
:class:`~pyro_lvm.models.nets.MLP`.

:class:`ConvEncoder`: ``num_blocks`` stride-2 convolutions (kernel 4, padding 1), each
halving the side and doubling the channels (``channels``, ``2 * channels``, ...), then
``Linear(hidden_dim) -> act`` and a final :class:`torch.nn.Linear` to ``out_dim``. The last
module is always that ``nn.Linear`` (:attr:`ConvEncoder.head`), the state of
:class:`pyro_lvm.infer.AmortizedLangevin`'s chain in a Langevin autoencoder.

:class:`ConvDecoder` mirrors it: ``Linear(hidden_dim) -> act -> Linear -> act``, reshaped to
the smallest feature map, then transposed convolutions doubling the side back to
``H x W`` with ``C`` output channels: the likelihood's parameters for every pixel.

With two blocks (the default) 28x28 inputs go 28 -> 14 -> 7, 32x32 go 32 -> 16 -> 8 and
the 8x8 digits 8 -> 4 -> 2; the side must be divisible by ``2 ** num_blocks``.
``layer_norm`` normalises every hidden layer: :class:`torch.nn.GroupNorm` with one group
(a LayerNorm over each feature map) after convolutions, :class:`torch.nn.LayerNorm` after
the fully connected layer. ``orthogonal_init`` gives every ``Linear`` and convolution
orthogonal weights and zero biases, as :class:`~pyro_lvm.models.nets.MLP` does.

References
----------
Radford, Metz, Chintala (2016), "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", ICLR.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyro_lvm.models.nets import _ACTIVATIONS

__all__ = ["ConvDecoder", "ConvEncoder", "ARCHS", "image_shape_for"]

#: ``--arch`` choices
ARCHS = ("mlp", "conv")

#: flattened size -> image shape, for callers that only know ``data_dim``
_KNOWN_SHAPES = {64: (1, 8, 8), 784: (1, 28, 28), 1024: (1, 32, 32), 3072: (3, 32, 32)}


def image_shape_for(data_dim: int, image_shape: tuple[int, ...] | None = None) -> tuple:
    """``(C, H, W)`` of flattened images of ``data_dim`` pixels.

    ``image_shape`` (e.g. a :class:`~pyro_lvm.data.DataBundle`'s) wins; otherwise the
    known sizes: 64 (8x8 digits), 784 (28x28 MNIST), 1024 (32x32 grey), 3072 (32x32 RGB).
    """
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3 or math.prod(shape) != data_dim:
            raise ValueError(
                f"image_shape {tuple(image_shape)} does not describe {data_dim}-dim images; "
                "pass (channels, height, width)"
            )
        return shape
    if data_dim not in _KNOWN_SHAPES:
        raise ValueError(
            f"--arch conv needs image data; {data_dim}-dim data has no known image shape "
            f"(known: {', '.join(f'{d} -> {s}' for d, s in _KNOWN_SHAPES.items())}); "
            "use --arch mlp"
        )
    return _KNOWN_SHAPES[data_dim]


def _check(image_shape: tuple, num_blocks: int, channels: int, hidden_dim: int) -> tuple:
    c, h, w = image_shape
    if num_blocks < 1 or channels < 1 or hidden_dim < 1:
        raise ValueError(
            f"conv nets need num_blocks, channels, hidden_dim >= 1, got {num_blocks}, "
            f"{channels}, {hidden_dim}"
        )
    factor = 2**num_blocks
    if h % factor or w % factor:
        raise ValueError(
            f"image side {h}x{w} is not divisible by 2**num_blocks = {factor}; use fewer "
            "blocks or --arch mlp"
        )
    return c, h // factor, w // factor


def _init_orthogonal(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.orthogonal_(m.weight)
            nn.init.zeros_(m.bias)


class _Unflatten(nn.Module):
    """``(..., D) -> (N, C, H, W)`` (any batch dimensions flattened into ``N``)."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *self.shape)


class ConvEncoder(nn.Sequential):
    """Strided convolutions, one hidden ``Linear``, and a final ``nn.Linear(out_dim)``.

    Parameters
    ----------
    image_shape : tuple
        ``(C, H, W)`` of the (flattened) inputs.
    out_dim : int
        Output width (e.g. ``2 * latent_dim`` for a Gaussian encoder).
    hidden_dim : int
        Width of the fully connected hidden layer.
    channels : int
        Channels of the first convolution (doubled by each further block).
    num_blocks : int
        Stride-2 convolutions (each halves the image side).
    layer_norm, activation, orthogonal_init
        As for :class:`~pyro_lvm.models.nets.MLP`.
    """

    def __init__(
        self,
        image_shape: tuple,
        out_dim: int,
        hidden_dim: int = 256,
        channels: int = 32,
        num_blocks: int = 2,
        layer_norm: bool = False,
        activation: str = "relu",
        orthogonal_init: bool = False,
    ):
        if out_dim <= 0:
            raise ValueError(f"ConvEncoder out_dim must be positive, got {out_dim}")
        c, h, w = _check(tuple(image_shape), num_blocks, channels, hidden_dim)
        act = _ACTIVATIONS[activation]
        layers: list[nn.Module] = [_Unflatten(image_shape)]
        width = c
        for i in range(num_blocks):
            out = channels * 2**i
            layers.append(nn.Conv2d(width, out, kernel_size=4, stride=2, padding=1))
            if layer_norm:
                layers.append(nn.GroupNorm(1, out))
            layers.append(act())
            width = out
        layers += [nn.Flatten(), nn.Linear(width * h * w, hidden_dim)]
        if layer_norm:
            layers.append(nn.LayerNorm(hidden_dim))
        layers += [act(), nn.Linear(hidden_dim, out_dim)]
        super().__init__(*layers)
        self.image_shape, self.out_dim = tuple(image_shape), out_dim
        self.in_dim = math.prod(image_shape)
        if orthogonal_init:
            _init_orthogonal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-1]
        return super().forward(x).reshape(*batch, self.out_dim)

    @property
    def trunk(self) -> nn.Sequential:
        """Every layer but the final ``Linear`` (outputs ``(N, hidden_dim)``, batch flattened)."""
        return nn.Sequential(*list(self)[:-1])

    @property
    def head(self) -> nn.Linear:
        """The final ``Linear`` layer."""
        return self[-1]


class ConvDecoder(nn.Sequential):
    """``latent -> Linear -> Linear -> transposed convolutions -> (..., C*H*W)``.

    Parameters
    ----------
    latent_dim : int
        Input width.
    image_shape : tuple
        ``(C, H, W)`` of the output; the output is flattened to ``C*H*W`` values (one
        likelihood parameter per pixel and channel).
    hidden_dim, channels, num_blocks, layer_norm, activation, orthogonal_init
        As for :class:`ConvEncoder` (the decoder mirrors it).
    """

    def __init__(
        self,
        latent_dim: int,
        image_shape: tuple,
        hidden_dim: int = 256,
        channels: int = 32,
        num_blocks: int = 2,
        layer_norm: bool = False,
        activation: str = "relu",
        orthogonal_init: bool = False,
    ):
        if latent_dim <= 0:
            raise ValueError(f"ConvDecoder latent_dim must be positive, got {latent_dim}")
        c, h, w = _check(tuple(image_shape), num_blocks, channels, hidden_dim)
        act = _ACTIVATIONS[activation]
        width = channels * 2 ** (num_blocks - 1)
        layers: list[nn.Module] = [nn.Linear(latent_dim, hidden_dim)]
        if layer_norm:
            layers.append(nn.LayerNorm(hidden_dim))
        layers += [act(), nn.Linear(hidden_dim, width * h * w)]
        if layer_norm:
            layers.append(nn.LayerNorm(width * h * w))
        layers += [act(), _Unflatten((width, h, w))]
        for i in reversed(range(num_blocks)):
            last = i == 0
            out = c if last else channels * 2 ** (i - 1)
            layers.append(nn.ConvTranspose2d(width, out, kernel_size=4, stride=2, padding=1))
            if not last:
                if layer_norm:
                    layers.append(nn.GroupNorm(1, out))
                layers.append(act())
            width = out
        super().__init__(*layers)
        self.image_shape, self.in_dim = tuple(image_shape), latent_dim
        self.out_dim = math.prod(image_shape)
        if orthogonal_init:
            _init_orthogonal(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        return super().forward(z.reshape(-1, z.shape[-1])).reshape(*batch, self.out_dim)
