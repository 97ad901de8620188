"""``pyro-lvm train vae``: Gaussian VAE trained by SVI."""

from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.infer.svi import ModuleSVI
from pyro_lvm.models.likelihoods import Likelihood
from pyro_lvm.models.vae import VAE
from pyro_lvm.recipes.base import Experiment, network_options

__all__ = ["build", "make_optimizer"]


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD at ``config.lr``."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose adam or sgd")


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    vae = VAE(
        data_dim,
        config.latent_dim,
        likelihood=likelihood,
        **network_options(config),
    )
    # analytic KL (TraceMeanField_ELBO) has lower variance for the Gaussian guide
    loss = TraceMeanField_ELBO() if config.analytic_kl else Trace_ELBO()
    svi = ModuleSVI(vae.model, vae.guide, make_optimizer(vae.parameters(), config), loss=loss)
    return Experiment(lvm=vae, inference=svi, modules=vae)
