"""``pyro-lvm train vae-flow``: a VAE whose guide is refined by normalizing flows.

The model is :class:`~pyro_lvm.models.VAEFlow` on the VAE recipe's networks
(``--hidden-dim``, ``--depth``, ``--layer-norm``, ``--orthogonal-init``, ``--arch``): the
encoder's Gaussian is pushed through ``--num-flows`` (default 2) inverse autoregressive
flows (``--flow iaf``; ``planar`` for planar flows) conditioned on a context the encoder
outputs. Trained by SVI on ``Trace_ELBO`` (the flow guide has no analytic KL), a valid
bound; evaluation uses the trained flow guide as the proposal, like the VAE's.
"""

from __future__ import annotations

from pyro.infer import Trace_ELBO

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes.base import (
    Experiment,
    conv_networks,
    network_arch,
    network_options,
)
from pyro_lvm.experiments.recipes.vae import make_optimizer
from pyro_lvm.infer.svi import ModuleSVI
from pyro_lvm.models.likelihoods import Likelihood
from pyro_lvm.models.vae_flow import VAEFlow

__all__ = ["build", "DEFAULT_NUM_FLOWS", "DEFAULT_FLOW", "CONTEXT_DIM"]

DEFAULT_NUM_FLOWS = 2
DEFAULT_FLOW = "iaf"
#: encoder outputs fed to every flow beside the Gaussian's loc and scale
CONTEXT_DIM = 16


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    num_flows = getattr(config, "num_flows", DEFAULT_NUM_FLOWS)
    flow = getattr(config, "flow", DEFAULT_FLOW)
    nets = {}
    if network_arch(config) == "conv":
        out = 2 * config.latent_dim + CONTEXT_DIM
        nets["encoder"], nets["decoder"] = conv_networks(config, data_dim, out)
    vae = VAEFlow(
        data_dim,
        config.latent_dim,
        num_flows=num_flows,
        flow=flow,
        context_dim=CONTEXT_DIM,
        likelihood=likelihood,
        **network_options(config),
        **nets,
    )
    svi = ModuleSVI(
        vae.model, vae.guide, make_optimizer(vae.parameters(), config), loss=Trace_ELBO()
    )
    return Experiment(
        lvm=vae, inference=svi, modules=vae, info={"num_flows": num_flows, "flow": flow}
    )
