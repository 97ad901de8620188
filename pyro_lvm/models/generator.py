r"""A generator network: a decoder-only latent variable model (no encoder).

.. math::

    z_i \sim \mathcal N(0, I), \qquad x_i \mid z_i \sim p_\theta(x_i \mid z_i),

trained by non-amortized inference, e.g. particle gradient descent
(:class:`pyro_lvm.infer.PGD`), which keeps posterior samples per datapoint instead of an
encoder (Han et al. 2017 call this model a generator network). Its decoder is the VAE's
(same :class:`~pyro_lvm.models.nets.MLP` or convolutional decoder), so the two compare on
identical networks.

There is no guide. :meth:`GeneratorNetwork.encode` (figures: reconstructions, latent
scatter) uses ``posterior_mean``, a callable ``x -> z`` the inference that trained the
model supplies (e.g. the mean of a Langevin proposal); without one it raises.

References
----------
Han, Lu, Zhu, Wu (2017), "Alternating back-propagation for generator network", AAAI.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_lvm.models.base import LatentVariableModel
from pyro_lvm.models.likelihoods import BernoulliLikelihood, Likelihood
from pyro_lvm.models.nets import MLP

__all__ = ["GeneratorNetwork"]


class GeneratorNetwork(LatentVariableModel):
    """:math:`p(z)\\,p_\\theta(x \\mid z)` with an MLP (or given) decoder and no encoder.

    Parameters
    ----------
    data_dim, latent_dim : int
        Data and latent dimensions.
    hidden_dim, depth, layer_norm, orthogonal_init, activation
        The decoder MLP's options (as :class:`~pyro_lvm.models.VAE`'s).
    likelihood : Likelihood, optional
        Observation model (default Bernoulli).
    decoder : nn.Module, optional
        Replace the MLP decoder.
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
    ):
        if latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        if decoder is None:
            decoder = MLP(
                latent_dim,
                data_dim,
                hidden_dim=hidden_dim,
                depth=depth,
                layer_norm=layer_norm,
                orthogonal_init=orthogonal_init,
                activation=activation,
            )
        super().__init__(data_dim, latent_dim, decoder, likelihood or BernoulliLikelihood())
        #: ``x -> z``: a posterior point summary supplied by the model's inference
        self.posterior_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    def guide(self, x: torch.Tensor) -> None:
        raise NotImplementedError(
            "GeneratorNetwork has no guide (no encoder); evaluate it with a proposal from "
            "its inference, e.g. pyro_lvm.infer.map_langevin_proposal, or with AIS"
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``posterior_mean(x)`` (the inference's posterior point summary)."""
        if self.posterior_mean is None:
            raise NotImplementedError(
                "GeneratorNetwork has no encoder; set posterior_mean to a posterior point "
                "summary x -> z (pyro-lvm train pgd sets its Langevin proposal's mean)"
            )
        return self.posterior_mean(x)
