"""``pyro-lvm train ae-gmm``: autoencoder + Gaussian-mixture prior on its codes.

Training minimises the reconstruction loss (:class:`~pyro_lvm.infer.AutoencoderFit`);
the trainer must then call ``experiment.inference.finalize(train_x)`` with the full
training set, which fits the ``--num-components`` mixture prior by EM and the evaluation
proposal's scale, before evaluating or sampling. Extra metric: ``test_recon_nll``, the
per-datapoint reconstruction loss on the test set.
"""

from __future__ import annotations

import torch

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes.base import Experiment
from pyro_lvm.experiments.recipes.vae import make_optimizer
from pyro_lvm.infer.autoencoder import AutoencoderFit
from pyro_lvm.models.ae_gmm import AEGMM
from pyro_lvm.models.likelihoods import Likelihood

__all__ = ["build"]


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    ae = AEGMM(
        data_dim,
        config.latent_dim,
        num_components=config.num_components,
        hidden_dim=config.hidden_dim,
        depth=config.depth,
        likelihood=likelihood,
        layer_norm=config.layer_norm,
    )
    inference = AutoencoderFit(
        ae.reconstruction_log_prob, make_optimizer(ae.parameters(), config), finalize=ae.finalize
    )

    @torch.no_grad()
    def extra_metrics(test_x: torch.Tensor) -> dict[str, float]:
        return {"test_recon_nll": -ae.reconstruction_log_prob(test_x).mean().item()}

    return Experiment(
        lvm=ae,
        inference=inference,
        modules=ae,
        eval_guide=ae.guide,
        extra_metrics=extra_metrics,
        info={"num_components": config.num_components},
        finalize=inference.finalize,
    )
