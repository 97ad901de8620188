"""pyro_lvm: deep latent variable models in Pyro.

VAEs trained by SVI, score-function estimators for Bernoulli latents, and amortized
Langevin dynamics (Langevin autoencoders), with shared data loading, evaluation and a CLI.
"""

__version__ = "0.1.0"


def load_run(*args, **kwargs):
    """Load a trained run folder; see :func:`pyro_lvm.experiments.runs.load_run`."""
    from pyro_lvm.experiments.runs import load_run as _load_run

    return _load_run(*args, **kwargs)


__all__ = ["__version__", "load_run"]
