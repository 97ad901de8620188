"""``pyro-lvm train ppca``: probabilistic PCA fitted four ways (``--fit``).

- ``svi``: :class:`~pyro_lvm.infer.ModuleSVI` with ``Trace_ELBO`` on ``model``/``guide``
  (the guide can represent the exact posterior, so the ELBO gap can close);
- ``gradient``: :class:`~pyro_lvm.infer.MarginalLikelihoodGD` on the exact marginal
  likelihood (no guide; evaluation uses the exact posterior);
- ``closed-form`` / ``em``: :class:`~pyro_lvm.infer.ClosedFormFit`; the trainer must call
  ``experiment.inference.prepare(train_x)`` with the full training set first.

Every fit reports ``test_nll_exact`` (and ``test_nll_exact_per_dim``): the exact
:math:`-\\log p(x)` per test datapoint.
"""

from __future__ import annotations

from functools import partial

import torch

from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.recipes.base import Experiment
from pyro_lvm.experiments.recipes.vae import make_optimizer
from pyro_lvm.infer.closed_form import ClosedFormFit
from pyro_lvm.infer.marginal import MarginalLikelihoodGD
from pyro_lvm.infer.svi import ModuleSVI
from pyro_lvm.models.likelihoods import GaussianLikelihood, Likelihood
from pyro_lvm.models.ppca import PPCA

__all__ = ["FITS", "EM_ITERS", "EM_TOL", "build"]

FITS = ("svi", "gradient", "closed-form", "em")
#: EM stops after this many iterations or once a step gains less than EM_TOL nats/datapoint
EM_ITERS = 5000
EM_TOL = 1e-10


def build(config: TrainConfig, data_dim: int, likelihood: Likelihood) -> Experiment:
    if not isinstance(likelihood, GaussianLikelihood):
        raise ValueError(
            f"ppca needs a Gaussian likelihood, got {likelihood.name!r}; pass --likelihood "
            "gaussian"
        )
    if config.fit not in FITS:
        raise ValueError(f"unknown --fit {config.fit!r} for ppca; choose one of {', '.join(FITS)}")
    ppca = PPCA(data_dim, config.latent_dim, likelihood=likelihood)
    if config.fit == "svi":
        optim = make_optimizer(ppca.parameters(), config)
        inference = ModuleSVI(ppca.model, ppca.guide, optim)
        eval_guide = ppca.guide  # honest ELBO of the trained guide
    else:
        if config.fit == "gradient":
            generative = [*ppca.decoder.parameters(), *ppca.likelihood.parameters()]
            inference = MarginalLikelihoodGD(
                ppca.exact_log_likelihood, make_optimizer(generative, config)
            )
        elif config.fit == "closed-form":
            inference = ClosedFormFit(ppca.fit_closed_form, ppca.exact_log_likelihood)
        else:
            # EM's random start draws from torch's global RNG, which --seed fixes
            fit = partial(ppca.fit_em, num_iters=EM_ITERS, tol=EM_TOL)
            inference = ClosedFormFit(fit, ppca.exact_log_likelihood)
        eval_guide = ppca.exact_guide  # the amortized guide is not trained by these fits

    @torch.no_grad()
    def extra_metrics(test_x: torch.Tensor) -> dict[str, float]:
        nll = -ppca.exact_log_likelihood(test_x).mean().item()
        return {"test_nll_exact": nll, "test_nll_exact_per_dim": nll / data_dim}

    return Experiment(
        lvm=ppca,
        inference=inference,
        modules=ppca,
        eval_guide=eval_guide,
        extra_metrics=extra_metrics,
        info={"fit": config.fit},
        prepare=inference.prepare if isinstance(inference, ClosedFormFit) else None,
    )
