"""``pyro-lvm train sbn``: sigmoid belief nets trained with a choice of gradient estimator.

Settings read from :class:`~pyro_lvm.experiments.config.TrainConfig`:

* ``latent_dim`` binary units per layer (the benchmarks use 200: pass ``--latent-dim 200``),
  ``num_layers`` stochastic layers (1-3);
* ``depth`` deterministic hidden layers per map (0: the *linear* benchmark model;
  2: the *nonlinear* one, LeakyReLU(0.3)) of width ``hidden_dim`` (benchmarks: 200);
* ``estimator`` (see :data:`ESTIMATORS`) and ``num_particles``.

Training passes dataset row indices (``pass_index``), which per-datapoint running
averages are keyed by; losses are batch sums (no ``N/B`` scaling).
"""

from __future__ import annotations

from pyro.infer import ELBO
from torch import nn

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes.base import Experiment
from pyro_lvm.experiments.recipes.vae import make_optimizer
from pyro_lvm.infer.baselines import NeuralBaseline, RunningAverageBaseline, SignalNormalization
from pyro_lvm.infer.disarm import DisARM
from pyro_lvm.infer.nvil import TraceNVIL_ELBO
from pyro_lvm.infer.svi import ModuleSVI
from pyro_lvm.infer.tracegraph import DifferentiableTraceGraph_ELBO
from pyro_lvm.infer.vimco import VIMCO
from pyro_lvm.models.likelihoods import Likelihood
from pyro_lvm.models.sbn import SigmoidBeliefNet

__all__ = ["ESTIMATORS", "build", "make_estimator", "nvil_baselines"]

#: ``--estimator`` choices and what they mean
ESTIMATORS = {
    "reinforce": "score function of each datapoint's whole ELBO, no baseline (no RB)",
    "tracegraph": "Pyro's TraceGraph_ELBO with its decaying-average baseline",
    "nvil": "TraceNVIL_ELBO: Rao-Blackwellized, running average + neural baseline + "
    "signal normalisation",
    "vimco": "VIMCO: K-sample bound with leave-one-out baselines (--num-particles >= 2)",
    "disarm": "DisARM: antithetic pairs for one factorized Bernoulli layer (--num-layers 1)",
}


def nvil_baselines(
    sites, data_dim: int, hidden_dim: int = 100, per_datapoint: bool = False
) -> dict:
    """NVIL's recipe for every site: a running average :math:`c`, an MLP baseline
    :math:`C_\\psi(x)` (one tanh hidden layer) fitted to the rest, and variance
    normalisation.

    The running average is global by default: on binarized digits it gave lower encoder-
    gradient variance combined with the neural baseline than the per-datapoint average
    (``per_datapoint=True``), whose entries are refreshed only once per epoch
    (see ``docs/bernoulli_latents.md``).
    """
    return {
        site: [
            RunningAverageBaseline(beta=0.9, per_datapoint=per_datapoint),
            NeuralBaseline(
                nn.Sequential(nn.Linear(data_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))
            ),
            SignalNormalization(beta=0.8),
        ]
        for site in sites
    }


def make_estimator(name: str, num_particles: int, sites, data_dim: int) -> ELBO:
    """The ``--estimator`` by name (one-line ``ValueError`` for unknown names)."""
    vectorize = dict(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )
    if name == "reinforce":
        return TraceNVIL_ELBO(rao_blackwellize=False, **vectorize)
    if name == "tracegraph":
        return DifferentiableTraceGraph_ELBO(
            decaying_avg_baseline=True, reset_on_resize=True, **vectorize
        )
    if name == "nvil":
        return TraceNVIL_ELBO(
            baselines=nvil_baselines(sites, data_dim), cache_dependencies=True, **vectorize
        )
    if name == "vimco":
        if num_particles < 2:
            raise ValueError(f"--estimator vimco needs --num-particles >= 2, got {num_particles}")
        return VIMCO(num_particles=num_particles, max_plate_nesting=1, vectorize_particles=True)
    if name == "disarm":
        if len(sites) != 1:
            raise ValueError(
                f"--estimator disarm needs --num-layers 1 (one Bernoulli layer), got {len(sites)}"
            )
        return DisARM(num_particles=num_particles)
    raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    sbn = SigmoidBeliefNet(
        data_dim,
        config.latent_dim,
        num_layers=config.num_layers,
        hidden_dim=config.hidden_dim,
        depth=config.depth,
        likelihood=likelihood,
    )
    loss = make_estimator(config.estimator, config.num_particles, sbn.latent_sites, data_dim)
    modules: nn.Module = sbn
    params = list(sbn.parameters())
    if isinstance(loss, TraceNVIL_ELBO):
        # baseline networks are optimised with the model; running averages are buffers
        params += list(loss.parameters())
        modules = nn.ModuleDict({"lvm": sbn, "baselines": loss.baselines})
    svi = ModuleSVI(sbn.model, sbn.guide, make_optimizer(params, config), loss=loss)
    return Experiment(
        lvm=sbn,
        inference=svi,
        modules=modules,
        continuous_latents=False,
        pass_index=True,
        info={"estimator": config.estimator, "num_layers": config.num_layers},
    )
