"""``pyro-lvm train lae``: Langevin autoencoder trained by amortized Langevin dynamics.

The model is :class:`~pyro_lvm.models.LangevinAutoencoder`: the VAE recipe's decoder
(``--hidden-dim``, ``--depth``, ``--layer-norm``) and a deterministic MLP encoder with the
same trunk, trained by :class:`pyro_lvm.infer.LAE` (Algorithm 2 of Taniguchi et al. 2022)
with ``--num-steps`` MALA transitions per minibatch (``--no-mh``: unadjusted), step
size ``--step-size`` (default: found by a doubling/halving search at the first step, then)
adapted towards ``--target-accept-prob`` throughout training unless ``--no-adapt-step-size``.

``--feature-norm center`` centres the encoder features with running means before the
chain layer (:class:`~pyro_lvm.models.centering.FeatureCentering`): without it the
features' shared direction dictates a tiny step size (see docs/langevin.md, "Beating the
VAE"). LAE corrects the trunk's gradient for the Jacobian of the chain layer
(``--no-jacobian`` drops it; without it the trunk pulls the features to zero volume;
docs/langevin.md, "The trunk descends a log-determinant"), and the chain's proposal
noise is projected onto the batch's feature span (``--no-project-noise``: the paper's
isotropic noise; docs/langevin.md, "Projected proposal noise"). ``--orthogonal-init``
gives every network the paper's initialisation.

The chain's potential is the plain minibatch sum (temperature 1, as in the paper). ALD
needs the encoder's last hidden width (``--hidden-dim``) to be at least the batch size
(``--batch-size``); otherwise the kernel warns (samples of some datapoints collapse).

Evaluation follows the paper: the proposal is
:math:`\\mathcal N(\\text{encoder}(x), s^2 I)` with ``s = --test-scale`` (0.05) for
``test_nelbo`` and ``test_nll``; with ``--refine-steps S > 0`` it is instead a Gaussian
fitted to S-step per-datapoint MALA chains started at the encoder output
(:class:`~pyro_lvm.infer.refine.LangevinProposalGuide`). ``--eval-ais`` needs no proposal.
The trainer logs ``inference.metrics()``: ``accept_rate`` and ``step_size``.
"""

from __future__ import annotations

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes.base import (
    Experiment,
    conv_networks,
    langevin_experiment,
    network_arch,
    network_options,
)
from pyro_lvm.experiments.recipes.vae import make_optimizer
from pyro_lvm.infer.lae import LAE
from pyro_lvm.models.centering import FeatureCentering
from pyro_lvm.models.lae import LangevinAutoencoder
from pyro_lvm.models.likelihoods import Likelihood

__all__ = ["build"]


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    nets, feature_norm = {}, config.feature_norm
    if network_arch(config) == "conv":
        encoder, nets["decoder"] = conv_networks(config, data_dim, config.latent_dim)
        if feature_norm != "none":  # as the MLP encoder: centring right before the chain layer
            centering = FeatureCentering(
                config.hidden_dim, standardize=feature_norm == "standardize"
            )
            encoder.insert(len(encoder) - 1, centering)
            centering.compensate(encoder[-1])  # updates keep the encoder's function
        nets["encoder"], feature_norm = encoder, "none"
    lvm = LangevinAutoencoder(
        data_dim,
        config.latent_dim,
        likelihood=likelihood,
        **network_options(config),
        test_scale=config.test_scale,
        feature_norm=feature_norm,
        **nets,
    )
    lvm.feature_norm = config.feature_norm
    # LAE removes the chain weight (the encoder's last Linear) from the optimizer
    inference = LAE(
        lvm.model,
        lvm.encoder,
        make_optimizer(lvm.parameters(), config),
        num_steps=config.num_steps,
        step_size=config.step_size,
        mh=config.mh,
        adapt_step_size=config.adapt_step_size,
        target_accept_prob=config.target_accept_prob,
        precondition=config.precondition,
        project_noise=config.project_noise,
        jacobian=config.jacobian,
        jit_compile=config.compile_backend(),
    )
    return langevin_experiment(config, lvm, inference)
