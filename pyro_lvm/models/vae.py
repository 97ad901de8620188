r"""Variational autoencoder with Gaussian latents (Kingma & Welling 2014).

Model :math:`p(z)=\mathcal N(0,I)`, :math:`p_\theta(x\mid z)` = any
:class:`~pyro_lvm.models.likelihoods.Likelihood` of an :class:`~pyro_lvm.models.nets.MLP`
decoder; guide :math:`q_\phi(z\mid x)=\mathcal N(\mu_\phi(x), \mathrm{diag}\,
\sigma^2_\phi(x))` from an MLP encoder with ``2 * latent_dim`` outputs. Train with
:class:`pyro_lvm.infer.ModuleSVI` and ``Trace_ELBO`` (or ``TraceMeanField_ELBO`` for the
analytic KL term).

References
----------
Kingma, Welling (2014), "Auto-Encoding Variational Bayes", ICLR.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from pyro_lvm.models.base import LatentVariableModel
from pyro_lvm.models.likelihoods import BernoulliLikelihood, Likelihood
from pyro_lvm.models.nets import MLP

__all__ = ["VAE", "GaussianEncoder"]


class GaussianEncoder(MLP):
    """MLP with ``2 * latent_dim`` outputs, read as ``(loc, softplus -> scale)``."""

    def __init__(self, data_dim: int, latent_dim: int, min_scale: float = 1e-4, **mlp_kwargs):
        super().__init__(data_dim, 2 * latent_dim, **mlp_kwargs)
        self.latent_dim, self.min_scale = latent_dim, min_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, pre_scale = super().forward(x).split(self.latent_dim, dim=-1)
        return loc, F.softplus(pre_scale) + self.min_scale


class VAE(LatentVariableModel):
    """Gaussian-latent VAE with MLP encoder and decoder.

    Parameters
    ----------
    data_dim, latent_dim : int
        Data and latent dimensions.
    hidden_dim, depth : int
        Width and number of hidden layers of both networks.
    likelihood : Likelihood, optional
        Observation model (default Bernoulli).
    layer_norm, orthogonal_init : bool
        The LAE paper's network options.
    decoder : nn.Module, optional
        Replace the MLP decoder (e.g. a linear one for PPCA-like models).
    encoder : nn.Module, optional
        Replace the MLP encoder: a module mapping ``x`` to ``(loc, scale)``, e.g. a
        :class:`~pyro_lvm.models.nets.GaussianHead` around a
        :class:`~pyro_lvm.models.conv.ConvEncoder`.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dim: int = 256,
        depth: int = 2,
        likelihood: Likelihood | None = None,
        layer_norm: bool = False,
        orthogonal_init: bool = False,
        decoder: torch.nn.Module | None = None,
        activation: str = "relu",
        encoder: torch.nn.Module | None = None,
    ):
        net = dict(
            hidden_dim=hidden_dim,
            depth=depth,
            layer_norm=layer_norm,
            orthogonal_init=orthogonal_init,
            activation=activation,
        )
        if latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        if decoder is None:
            decoder = MLP(latent_dim, data_dim, **net)
        super().__init__(data_dim, latent_dim, decoder, likelihood or BernoulliLikelihood())
        self.encoder = (
            encoder if encoder is not None else GaussianEncoder(data_dim, latent_dim, **net)
        )

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        r""":math:`q_\phi(z \mid x)` as a distribution with one event dim."""
        loc, scale = self.encoder(x)
        return dist.Normal(loc, scale).to_event(1)

    def guide(self, x: torch.Tensor) -> None:
        """Pyro guide :math:`q_\\phi(z \\mid x)`."""
        self.register()
        with pyro.plate("data", x.shape[0]):
            pyro.sample(self.latent_site, self.posterior(x))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]
