"""``pyro-lvm train vae``: Gaussian VAE trained by SVI."""

from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes.base import (
    Experiment,
    conv_networks,
    network_arch,
    network_options,
)
from pyro_lvm.infer.svi import ModuleSVI
from pyro_lvm.models.likelihoods import Likelihood
from pyro_lvm.models.nets import GaussianHead
from pyro_lvm.models.vae import VAE

__all__ = ["build", "make_optimizer", "vae_networks"]


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD at ``config.lr``."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose adam or sgd")


def vae_networks(config: TrainConfig, data_dim: int) -> dict:
    """``encoder``/``decoder`` keyword arguments of :class:`VAE` for ``--arch`` (none for
    ``mlp``: the VAE builds its MLPs)."""
    if network_arch(config) == "mlp":
        return {}
    encoder, decoder = conv_networks(config, data_dim, 2 * config.latent_dim)
    return {"encoder": GaussianHead(encoder, config.latent_dim), "decoder": decoder}


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    vae = VAE(
        data_dim,
        config.latent_dim,
        likelihood=likelihood,
        **network_options(config),
        **vae_networks(config, data_dim),
    )
    # analytic KL (TraceMeanField_ELBO) has lower variance for the Gaussian guide
    loss = TraceMeanField_ELBO() if config.analytic_kl else Trace_ELBO()
    svi = ModuleSVI(
        vae.model,
        vae.guide,
        make_optimizer(vae.parameters(), config),
        loss=loss,
        jit_compile=config.compile_backend(),
    )
    return Experiment(lvm=vae, inference=svi, modules=vae)
