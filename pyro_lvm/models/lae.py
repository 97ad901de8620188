r"""Langevin autoencoder: a decoder model with a *deterministic* encoder.

The generative model is the VAE's (:class:`~pyro_lvm.models.base.LatentVariableModel`:
:math:`z_i \sim \mathcal N(0, I)`, :math:`x_i \mid z_i \sim p_\theta(x_i \mid z_i)`).
The encoder :math:`x \mapsto \Phi g(x; \psi) + b` is an :class:`~pyro_lvm.models.nets.MLP`
whose final ``nn.Linear`` weight :math:`\Phi` is the state of an amortized Langevin chain
(:class:`pyro_lvm.infer.LAE`): along the chain its outputs are posterior samples, so the
encoder is a sampler, not a variational distribution.

For likelihood evaluation the paper uses the proposal
:math:`q(z \mid x) = \mathcal N(\text{encoder}(x), s^2 I)` with :math:`s = 0.05`
(``test_scale``); :meth:`LangevinAutoencoder.guide` is that proposal.

References
----------
Taniguchi, Iwasawa, Kumagai, Matsuo (2022), "Langevin Autoencoders for Learning Deep
Latent Variable Models", NeurIPS.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from torch import nn

from pyro_lvm.models.base import LatentVariableModel
from pyro_lvm.models.centering import FeatureCentering
from pyro_lvm.models.likelihoods import Likelihood
from pyro_lvm.models.nets import MLP

__all__ = ["LangevinAutoencoder", "FEATURE_NORMS"]

#: encoder feature normalizations (see :class:`~pyro_lvm.models.centering.FeatureCentering`)
FEATURE_NORMS = ("none", "center", "standardize")


class LangevinAutoencoder(LatentVariableModel):
    """MLP decoder and deterministic MLP encoder with the same trunk settings.

    Parameters
    ----------
    data_dim, latent_dim : int
        Data and latent dimensions.
    likelihood : Likelihood, optional
        Observation model (default Bernoulli).
    test_scale : float
        Standard deviation :math:`s` of the evaluation proposal
        :math:`\\mathcal N(\\text{encoder}(x), s^2 I)`.
    feature_norm : {"none", "center", "standardize"}
        Insert a :class:`~pyro_lvm.models.centering.FeatureCentering` layer between the
        default encoder's trunk and its final ``nn.Linear``: running-mean centring (and,
        for ``"standardize"``, per-feature scaling) of the features :math:`g(x)`, which
        removes the common mode that dominates :math:`G G^\\top` and dictates the ALD
        step size. Default ``"none"`` (the paper's encoder).
    decoder, encoder : nn.Module, optional
        Replace the MLPs (the encoder must output the latents from an ``nn.Linear``).
    **net
        Network options of both MLPs (``hidden_dim``, ``depth``, ``layer_norm``,
        ``orthogonal_init``, ``activation``; :data:`~pyro_lvm.models.base.NETWORK_DEFAULTS`).
        ALD needs the encoder's last hidden width to be at least the batch size (the rank
        condition).
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        likelihood: Likelihood | None = None,
        test_scale: float = 0.05,
        decoder: nn.Module | None = None,
        encoder: nn.Module | None = None,
        feature_norm: str = "none",
        **net: Any,
    ):
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(
                f"unknown feature_norm {feature_norm!r}; choose one of {list(FEATURE_NORMS)}"
            )
        if feature_norm != "none" and encoder is not None:
            raise ValueError(
                "feature_norm applies to the default MLP encoder; add a FeatureCentering "
                "layer to your own encoder instead"
            )
        if not test_scale > 0:
            raise ValueError(f"test_scale must be positive, got {test_scale}")
        super().__init__(data_dim, latent_dim, decoder, likelihood, **net)
        if encoder is None:
            encoder = MLP(data_dim, latent_dim, **self.net)
            if feature_norm != "none":
                width = self.net["hidden_dim"] if self.net["depth"] > 0 else data_dim
                centering = FeatureCentering(width, standardize=feature_norm == "standardize")
                encoder.insert(len(encoder) - 1, centering)  # the last module stays Linear
                centering.compensate(encoder[-1])  # updates keep the encoder's function
        self.encoder = encoder
        self.feature_norm = feature_norm
        self.test_scale = test_scale

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """The evaluation proposal :math:`\\mathcal N(\\text{encoder}(x), s^2 I)`."""
        loc = self.encoder(x)
        return dist.Normal(loc, torch.full_like(loc, self.test_scale)).to_event(1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)
