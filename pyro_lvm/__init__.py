"""pyro_lvm: deep latent variable models in Pyro.

VAEs trained by SVI, score-function estimators for Bernoulli latents, and amortized
Langevin dynamics (Langevin autoencoders), with shared data loading, evaluation and a CLI.
"""

__version__ = "0.1.0"
