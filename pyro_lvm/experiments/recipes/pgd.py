"""``pyro-lvm train pgd``: particle gradient descent on the VAE's decoder, no encoder.

The model is a :class:`~pyro_lvm.models.GeneratorNetwork` with the decoder of the ``vae``
recipe (same networks and initialisation under the same seed: ``--hidden-dim``,
``--depth``, ``--layer-norm``, ``--orthogonal-init``, ``--arch``), trained by
:class:`pyro_lvm.infer.PGD` (Kuntz, Lim & Johansen 2023): ``--num-particles`` K particles
per training datapoint, stored per dataset row and moved by ``--num-steps`` Langevin
steps each time the row's batch comes round (MALA with a step size adapted towards
``--target-accept-prob`` unless ``--no-mh`` / ``--no-adapt-step-size``; ``--step-size``
is the initial one, default 0.01), and one optimizer step of the decoder on the batch's
particle-averaged negative log joint. It is the non-amortized counterpart of ``lae``.

Evaluation: test data have no particles, so ``test_nelbo`` and ``test_nll`` use a
Gaussian proposal fitted to ``--refine-steps`` MALA steps (half warmup) of 8 chains per
test datapoint, started at its best of 8 posterior modes found by 100 Adam steps from
prior draws (:func:`pyro_lvm.infer.map_langevin_proposal`; named under
``eval_proposal``): a valid bound; ``--eval-ais`` judges the decoder without a proposal.
The figures' reconstructions and latent scatter use that proposal's mean.
"""

from __future__ import annotations

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes.base import Experiment, network_options
from pyro_lvm.experiments.recipes.vae import make_optimizer, vae_networks
from pyro_lvm.infer.pgd import PGD, map_langevin_proposal
from pyro_lvm.models.generator import GeneratorNetwork
from pyro_lvm.models.likelihoods import Likelihood

__all__ = ["DEFAULT_STEP_SIZE", "build"]

#: initial Langevin step size of the particles (adapted by default)
DEFAULT_STEP_SIZE = 0.01


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    if config.refine_steps < 2:
        raise ValueError(
            f"pgd evaluates test data (which have no particles) with a proposal fitted to "
            f"--refine-steps MALA steps; pass --refine-steps >= 2, got {config.refine_steps}"
        )
    # the vae recipe's decoder: for --arch conv, built after its encoder, as the VAE does
    decoder = vae_networks(config, data_dim).get("decoder")  # None: the MLP
    lvm = GeneratorNetwork(
        data_dim,
        config.latent_dim,
        likelihood=likelihood,
        decoder=decoder,
        **network_options(config),
    )
    inference = PGD(
        lvm.model,
        make_optimizer(lvm.parameters(), config),
        num_particles=config.num_particles,
        num_steps=config.num_steps,
        step_size=config.step_size if config.step_size is not None else DEFAULT_STEP_SIZE,
        mh=config.mh,
        adapt_step_size=config.adapt_step_size,
        target_accept_prob=config.target_accept_prob,
        eval_steps=config.refine_steps,
    )
    proposal = map_langevin_proposal(
        lvm.model, config.refine_steps, target_accept_prob=config.target_accept_prob
    )
    lvm.posterior_mean = lambda x: proposal.proposal(x).loc
    return Experiment(
        lvm=lvm,
        inference=inference,
        modules=lvm,
        eval_guide=proposal,
        pass_index=True,
        info={
            "eval_proposal": (
                f"langevin-refined ({config.refine_steps} MALA steps from the best of 8 "
                "MAP ascents from the prior)"
            ),
            "target_accept_prob": config.target_accept_prob
            if config.mh and config.adapt_step_size
            else None,
        },
    )
