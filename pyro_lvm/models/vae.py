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

from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F

from pyro_lvm.models.base import LatentVariableModel
from pyro_lvm.models.likelihoods import Likelihood
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
    likelihood : Likelihood, optional
        Observation model (default Bernoulli).
    decoder : nn.Module, optional
        Replace the MLP decoder (e.g. a linear one for PPCA-like models).
    encoder : nn.Module, optional
        Replace the MLP encoder: a module mapping ``x`` to ``(loc, scale)``, e.g. a
        :class:`~pyro_lvm.models.nets.GaussianHead` around a
        :class:`~pyro_lvm.models.conv.ConvEncoder`.
    **net
        Network options of both MLPs: ``hidden_dim``, ``depth``, ``layer_norm``,
        ``orthogonal_init`` (the LAE paper's), ``activation``; defaults in
        :data:`~pyro_lvm.models.base.NETWORK_DEFAULTS`.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        likelihood: Likelihood | None = None,
        decoder: torch.nn.Module | None = None,
        encoder: torch.nn.Module | None = None,
        **net: Any,
    ):
        super().__init__(data_dim, latent_dim, decoder, likelihood, **net)
        self.encoder = (
            encoder if encoder is not None else GaussianEncoder(data_dim, latent_dim, **self.net)
        )

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        r""":math:`q_\phi(z \mid x)` as a distribution with one event dim."""
        loc, scale = self.encoder(x)
        return dist.Normal(loc, scale).to_event(1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]
