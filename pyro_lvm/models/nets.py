"""Fully connected networks shared by every model.

The LAE paper's networks (Taniguchi et al. 2022, authors' code): ``depth`` blocks of
``Linear(width) -> LayerNorm -> ReLU``, then a final ``Linear``, orthogonal weight
initialisation. Every method in a comparison uses the same :class:`MLP`, so differences
come from inference, not architecture.
"""

from __future__ import annotations

from torch import nn

__all__ = ["MLP", "GaussianHead"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU}


class MLP(nn.Sequential):
    """``in_dim -> [Linear(hidden) -> (LayerNorm) -> act] x depth -> Linear(out_dim)``.

    The last module is always an :class:`torch.nn.Linear`, which
    :class:`pyro_lvm.infer.AmortizedLangevin` uses as the chain state.

    Parameters
    ----------
    in_dim, out_dim : int
        Input and output widths.
    hidden_dim : int
        Width of every hidden layer.
    depth : int
        Number of hidden layers (0 gives a linear map).
    layer_norm : bool
        Insert :class:`torch.nn.LayerNorm` after each hidden ``Linear``.
    activation : str
        One of ``relu``, ``tanh``, ``elu``, ``leaky_relu``.
    orthogonal_init : bool
        Orthogonal weights and zero biases, as in the LAE paper's code.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 256,
        depth: int = 2,
        layer_norm: bool = False,
        activation: str = "relu",
        orthogonal_init: bool = False,
    ):
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if value <= 0:
                raise ValueError(f"MLP {name} must be positive, got {value}")
        if depth < 0 or (depth > 0 and hidden_dim <= 0):
            raise ValueError(
                f"MLP needs depth >= 0 and hidden_dim > 0, got depth={depth}, "
                f"hidden_dim={hidden_dim}"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}"
            )
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers.append(nn.Linear(width, hidden_dim))
            if layer_norm:
                layers.append(nn.LayerNorm(hidden_dim))
            layers.append(_ACTIVATIONS[activation]())
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim
        if orthogonal_init:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.orthogonal_(m.weight)
                    nn.init.zeros_(m.bias)

    @property
    def trunk(self) -> nn.Sequential:
        """Every layer but the final ``Linear`` (the features ``g(x)`` of ALD)."""
        return nn.Sequential(*list(self)[:-1])  # shares the layers

    @property
    def head(self) -> nn.Linear:
        """The final ``Linear`` layer."""
        return self[-1]


class GaussianHead(nn.Module):
    """Reads any network's ``2 * latent_dim`` outputs as ``(loc, softplus -> scale)``.

    Wraps a non-MLP encoder (e.g. :class:`~pyro_lvm.models.conv.ConvEncoder`) so it can
    stand in for :class:`~pyro_lvm.models.vae.GaussianEncoder` (``VAE(encoder=...)``).
    """

    def __init__(self, net: nn.Module, latent_dim: int, min_scale: float = 1e-4):
        super().__init__()
        self.net, self.latent_dim, self.min_scale = net, latent_dim, min_scale

    def forward(self, x):
        loc, pre_scale = self.net(x).split(self.latent_dim, dim=-1)
        return loc, nn.functional.softplus(pre_scale) + self.min_scale
