"""Inference algorithms and likelihood evaluation."""

from pyro_lvm.infer.diagnostics import DivergenceError
from pyro_lvm.infer.importance import (
    elbo_per_datapoint,
    iwae_log_likelihood,
    log_importance_weights,
)
from pyro_lvm.infer.svi import ModuleSVI

__all__ = [
    "DivergenceError",
    "ModuleSVI",
    "elbo_per_datapoint",
    "iwae_log_likelihood",
    "log_importance_weights",
]
