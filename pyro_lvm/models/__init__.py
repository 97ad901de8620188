"""Ready Pyro models, networks and likelihoods."""

from pyro_lvm.models.ae_gmm import AEGMM
from pyro_lvm.models.base import LatentVariableModel
from pyro_lvm.models.centering import FeatureCentering
from pyro_lvm.models.conv import ConvDecoder, ConvEncoder
from pyro_lvm.models.generator import GeneratorNetwork
from pyro_lvm.models.gmm import (
    GaussianMixtureInfo,
    GaussianMixtureParams,
    fit_gaussian_mixture,
    gaussian_mixture,
)
from pyro_lvm.models.lae import LangevinAutoencoder
from pyro_lvm.models.likelihoods import (
    BernoulliLikelihood,
    DiscretizedLogistic,
    DiscretizedLogisticLikelihood,
    GaussianLikelihood,
    Likelihood,
    make_likelihood,
)
from pyro_lvm.models.nets import MLP, GaussianHead
from pyro_lvm.models.ppca import (
    PPCA,
    PPCAParams,
    ppca_em,
    ppca_log_likelihood,
    ppca_mle,
    ppca_posterior,
)
from pyro_lvm.models.sbn import BernoulliVAE, SigmoidBeliefNet
from pyro_lvm.models.vae import VAE, GaussianEncoder
from pyro_lvm.models.vae_flow import VAEFlow

__all__ = [
    "FeatureCentering",
    "BernoulliVAE",
    "SigmoidBeliefNet",
    "AEGMM",
    "GaussianMixtureInfo",
    "GaussianMixtureParams",
    "fit_gaussian_mixture",
    "gaussian_mixture",
    "BernoulliLikelihood",
    "DiscretizedLogistic",
    "DiscretizedLogisticLikelihood",
    "GaussianEncoder",
    "GaussianLikelihood",
    "GeneratorNetwork",
    "LangevinAutoencoder",
    "LatentVariableModel",
    "Likelihood",
    "ConvDecoder",
    "ConvEncoder",
    "GaussianHead",
    "MLP",
    "PPCA",
    "PPCAParams",
    "VAE",
    "VAEFlow",
    "make_likelihood",
    "ppca_em",
    "ppca_log_likelihood",
    "ppca_mle",
    "ppca_posterior",
]
