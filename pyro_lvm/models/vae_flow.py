r"""VAE whose Gaussian guide is refined by normalizing flows (VAE-flow).

Model: the VAE's (:class:`~pyro_lvm.models.base.LatentVariableModel`). Guide: a diagonal
Gaussian from the encoder, pushed through ``num_flows`` invertible maps
:math:`f_K \circ \dots \circ f_1` from :mod:`pyro.distributions.transforms`,

.. math::

    z_0 \sim \mathcal N(\mu_\phi(x), \mathrm{diag}\,\sigma^2_\phi(x)), \qquad
    z = f_K(\dots f_1(z_0; h) \dots; h), \qquad
    \log q(z \mid x) = \log \mathcal N(z_0) - \sum_k \log\Bigl|\det
        \frac{\partial f_k}{\partial z_{k-1}}\Bigr| ,

where :math:`h = h_\phi(x)` is a context vector the encoder outputs beside
:math:`(\mu, \sigma)` (``context_dim`` extra outputs), so the flows are amortized over
data points as in Kingma et al. (2016). The change of variables is exact, so
``Trace_ELBO`` on ``model``/``guide`` is a valid lower bound on :math:`\log p(x)` and the
importance-weighted bound (:func:`pyro_lvm.infer.iwae_log_likelihood`) converges to it.

``flow="iaf"``: inverse autoregressive flows
(:func:`~pyro.distributions.transforms.conditional_affine_autoregressive`, a MADE network
per flow with a random variable order), initialised at the identity (the MADE's output
layer is zero), so a fresh VAE-flow's guide *is* the plain VAE's Gaussian.
``flow="planar"``: planar flows (Rezende & Mohamed 2015,
:func:`~pyro.distributions.transforms.conditional_planar`); they cannot be inverted, so
their ``log_prob`` is available only for their own samples (all the ELBO and IWAE need).
``context_dim=0`` makes the flows global (the same for every datapoint).

References
----------
Rezende, Mohamed (2015), "Variational Inference with Normalizing Flows", ICML.
Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling (2016), "Improved Variational
Inference with Inverse Autoregressive Flow", NeurIPS.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from torch import nn

from pyro_lvm.models.base import LatentVariableModel
from pyro_lvm.models.likelihoods import Likelihood
from pyro_lvm.models.nets import MLP

__all__ = ["VAEFlow", "FLOWS"]

#: ``flow`` choices
FLOWS = ("iaf", "planar")


def _make_flow(kind: str, latent_dim: int, context_dim: int, hidden_dim: int) -> nn.Module:
    if kind == "iaf":
        if context_dim > 0:
            flow = T.conditional_affine_autoregressive(
                latent_dim, context_dim, hidden_dims=[hidden_dim]
            )
            made = flow.nn
        else:
            flow = T.affine_autoregressive(latent_dim, hidden_dims=[hidden_dim])
            made = flow.arn
        # zero output layer: loc 0, log-scale 0, the identity map
        nn.init.zeros_(made.layers[-1].weight)
        nn.init.zeros_(made.layers[-1].bias)
        return flow
    if kind == "planar":
        if context_dim > 0:
            return T.conditional_planar(latent_dim, context_dim, hidden_dims=[hidden_dim])
        return T.planar(latent_dim)
    raise ValueError(f"unknown flow {kind!r}; choose one of {', '.join(FLOWS)}")


class VAEFlow(LatentVariableModel):
    """Gaussian-latent VAE with a flow-refined guide.

    Parameters
    ----------
    data_dim, latent_dim : int
        Data and latent dimensions.
    num_flows : int
        Number of flows (0 gives the plain VAE's Gaussian guide).
    flow : {"iaf", "planar"}
        Flow family.
    context_dim : int
        Extra encoder outputs fed to every flow (0: unconditional, global flows).
    flow_hidden_dim : int, optional
        Hidden width of each flow's network (default ``max(4 * latent_dim + context_dim,
        32)``; IAF needs at least ``latent_dim``).
    likelihood : Likelihood, optional
        Observation model (default Bernoulli).
    decoder, encoder : nn.Module, optional
        Replace the MLPs; ``encoder`` maps ``x`` to ``2 * latent_dim + context_dim``
        outputs, read as ``(loc, softplus -> scale, context)``.
    **net
        Network options of both MLPs: ``hidden_dim``, ``depth``, ``layer_norm``,
        ``orthogonal_init`` (the LAE paper's), ``activation``; defaults in
        :data:`~pyro_lvm.models.base.NETWORK_DEFAULTS`.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        num_flows: int = 2,
        flow: str = "iaf",
        context_dim: int = 16,
        flow_hidden_dim: int | None = None,
        likelihood: Likelihood | None = None,
        decoder: nn.Module | None = None,
        encoder: nn.Module | None = None,
        min_scale: float = 1e-4,
        **net: Any,
    ):
        if num_flows < 0:
            raise ValueError(f"num_flows must be >= 0, got {num_flows}")
        if context_dim < 0:
            raise ValueError(f"context_dim must be >= 0, got {context_dim}")
        if flow not in FLOWS:
            raise ValueError(f"unknown flow {flow!r}; choose one of {', '.join(FLOWS)}")
        super().__init__(data_dim, latent_dim, decoder, likelihood, **net)
        if encoder is None:
            encoder = MLP(data_dim, 2 * latent_dim + context_dim, **self.net)
        self.encoder = encoder
        if flow_hidden_dim is None:
            flow_hidden_dim = max(4 * latent_dim + context_dim, 32)
        self.flows = nn.ModuleList(
            _make_flow(flow, latent_dim, context_dim, flow_hidden_dim) for _ in range(num_flows)
        )
        self.num_flows, self.flow, self.context_dim = num_flows, flow, context_dim
        self.min_scale = min_scale

    def base_posterior(self, x: torch.Tensor) -> tuple[dist.Distribution, torch.Tensor]:
        """The Gaussian :math:`q_0(z_0 \\mid x)` and the flows' context :math:`h(x)`."""
        out = self.encoder(x)
        z = self.latent_dim
        loc, pre_scale, context = out.split([z, z, self.context_dim], dim=-1)
        scale = F.softplus(pre_scale) + self.min_scale
        return dist.Normal(loc, scale).to_event(1), context

    def transforms(self, context: torch.Tensor) -> list:
        """The flows, conditioned on ``context`` where they take one."""
        if self.context_dim == 0:
            return list(self.flows)
        return [f.condition(context) for f in self.flows]

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        r""":math:`q_\phi(z \mid x)`: the base Gaussian pushed through the flows."""
        base, context = self.base_posterior(x)
        if not self.flows:
            return base
        return dist.TransformedDistribution(base, self.transforms(context))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The base mean pushed through the flows (a point summary of :math:`q`)."""
        base, context = self.base_posterior(x)
        z = base.mean
        for t in self.transforms(context):
            z = t(z)
        return z
