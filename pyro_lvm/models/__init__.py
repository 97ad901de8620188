"""Ready Pyro models, networks and likelihoods."""

from pyro_lvm.models.base import LatentVariableModel
from pyro_lvm.models.likelihoods import (
    BernoulliLikelihood,
    DiscretizedLogistic,
    DiscretizedLogisticLikelihood,
    GaussianLikelihood,
    Likelihood,
    make_likelihood,
)
from pyro_lvm.models.nets import MLP
from pyro_lvm.models.ppca import (
    PPCA,
    PPCAParams,
    ppca_em,
    ppca_log_likelihood,
    ppca_mle,
    ppca_posterior,
)
from pyro_lvm.models.vae import VAE, GaussianEncoder

__all__ = [
    "BernoulliLikelihood",
    "DiscretizedLogistic",
    "DiscretizedLogisticLikelihood",
    "GaussianEncoder",
    "GaussianLikelihood",
    "LatentVariableModel",
    "Likelihood",
    "MLP",
    "PPCA",
    "PPCAParams",
    "VAE",
    "make_likelihood",
    "ppca_em",
    "ppca_log_likelihood",
    "ppca_mle",
    "ppca_posterior",
]
