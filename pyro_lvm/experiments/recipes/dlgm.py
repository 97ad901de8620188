"""``pyro-lvm train dlgm``: the Hoffman (2017) baseline on the VAE's networks.

The model is :class:`~pyro_lvm.models.VAE` with the same networks as the ``vae`` recipe
(``--hidden-dim``, ``--depth``, ``--layer-norm``), trained by :class:`pyro_lvm.infer.DLGM`
with ``--num-steps`` steps of size ``--step-size`` (default 0.005, the authors'),
MALA and step-size adaptation towards ``--target-accept-prob`` unless ``--no-mh`` /
``--no-adapt-step-size``. The Hoffman/LAE papers' exact setting is
``--no-mh --no-adapt-step-size --step-size 0.005``; the default gives the Langevin baselines
(DLGM, LAE) the same sampler treatment (MH, adapted steps) so the comparison is about
what they train, not how well their step size was guessed.

Evaluation (``test_nelbo``, ``test_nll``): the trained encoder :math:`q_\\phi(z \\mid x)`
is the proposal, as for the VAE: a valid (lower) bound, directly comparable with the
VAE's. With ``--refine-steps S > 0`` the proposal is instead a Gaussian fitted to S-step
per-datapoint MALA chains started at the encoder mean
(:class:`~pyro_lvm.infer.LangevinProposalGuide`), which matches how the decoder was
trained (on refined latents) and is still a valid bound. ``--eval-ais`` needs no proposal.
"""

from __future__ import annotations

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes.base import Experiment, langevin_experiment, network_options
from pyro_lvm.experiments.recipes.vae import make_optimizer, vae_networks
from pyro_lvm.infer.dlgm import DLGM
from pyro_lvm.models.likelihoods import Likelihood
from pyro_lvm.models.vae import VAE

__all__ = ["build", "DEFAULT_STEP_SIZE"]

#: the authors' Langevin step size for the Hoffman baseline
DEFAULT_STEP_SIZE = 0.005


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    vae = VAE(
        data_dim,
        config.latent_dim,
        likelihood=likelihood,
        **network_options(config),
        **vae_networks(config, data_dim),
    )
    inference = DLGM(
        vae.model,
        vae.guide,
        make_optimizer(vae.parameters(), config),
        num_steps=config.num_steps,
        step_size=config.step_size if config.step_size is not None else DEFAULT_STEP_SIZE,
        mh=config.mh,
        adapt_step_size=config.adapt_step_size,
        target_accept_prob=config.target_accept_prob,
        guide_params=list(vae.encoder.parameters()),
    )
    return langevin_experiment(config, vae, inference)
