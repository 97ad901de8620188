"""Inference algorithms and likelihood evaluation."""

from pyro_lvm.infer.ais import AISResult, ais_log_likelihood, annealed_importance_sampling
from pyro_lvm.infer.autoencoder import AutoencoderFit
from pyro_lvm.infer.baselines import (
    Baseline,
    ConstantBaseline,
    NeuralBaseline,
    RunningAverageBaseline,
    SignalNormalization,
)
from pyro_lvm.infer.closed_form import ClosedFormFit
from pyro_lvm.infer.diagnostics import DivergenceError
from pyro_lvm.infer.disarm import DisARM
from pyro_lvm.infer.dlgm import DLGM
from pyro_lvm.infer.driver import OptimizerDriver
from pyro_lvm.infer.importance import (
    elbo_per_datapoint,
    iwae_log_likelihood,
    log_importance_weights,
)
from pyro_lvm.infer.lae import LAE
from pyro_lvm.infer.marginal import MarginalLikelihoodGD
from pyro_lvm.infer.mcmc.amortized_langevin import AmortizedLangevin, RankConditionWarning
from pyro_lvm.infer.nvil import TraceNVIL_ELBO
from pyro_lvm.infer.optim import ParamOptimizer
from pyro_lvm.infer.refine import (
    GaussianProposal,
    LangevinProposalGuide,
    RefineInfo,
    fit_langevin_proposal,
    refine_latents,
)
from pyro_lvm.infer.svi import ModuleSVI
from pyro_lvm.infer.tracegraph import DifferentiableTraceGraph_ELBO
from pyro_lvm.infer.vimco import VIMCO

__all__ = [
    "Baseline",
    "ConstantBaseline",
    "DifferentiableTraceGraph_ELBO",
    "DisARM",
    "NeuralBaseline",
    "ParamOptimizer",
    "RunningAverageBaseline",
    "SignalNormalization",
    "TraceNVIL_ELBO",
    "VIMCO",
    "AutoencoderFit",
    "AISResult",
    "DLGM",
    "GaussianProposal",
    "LangevinProposalGuide",
    "RefineInfo",
    "ais_log_likelihood",
    "annealed_importance_sampling",
    "fit_langevin_proposal",
    "refine_latents",
    "AmortizedLangevin",
    "ClosedFormFit",
    "DivergenceError",
    "LAE",
    "MarginalLikelihoodGD",
    "ModuleSVI",
    "OptimizerDriver",
    "RankConditionWarning",
    "elbo_per_datapoint",
    "iwae_log_likelihood",
    "log_importance_weights",
]
