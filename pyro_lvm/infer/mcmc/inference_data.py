"""An ``arviz.InferenceData`` of any Pyro ``MCMC`` run, through ``arviz.from_dict``.

``arviz.from_pyro`` exists up to ArviZ 0.23 (and works with
:class:`~pyro_lvm.infer.AmortizedLangevin`); ArviZ 1.x drops it and reads plain dicts.
:func:`to_inference_data` builds the same groups from the run itself, so it works with
either: ``posterior`` (draws grouped by chain), ``sample_stats`` (``diverging`` per draw,
from the kernel's ``"divergences"``), and ``log_likelihood`` (each observed site's
log-density per draw and datapoint, from the model conditioned on the draw).
"""

from __future__ import annotations

from typing import Any

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask

__all__ = ["to_inference_data"]


def _numpy(t: torch.Tensor):
    return t.detach().cpu().numpy()


def _diverging(mcmc, chains: int, draws: int) -> torch.Tensor:
    flags = torch.zeros(chains, draws, dtype=torch.bool)
    divergences = mcmc.diagnostics().get("divergences", {})
    for c, key in enumerate(sorted(divergences)):
        for i in divergences[key]:
            if 0 <= i < draws:
                flags[c, i] = True
    return flags


@torch.no_grad()
def _log_likelihood(mcmc, samples: dict[str, torch.Tensor]) -> dict[str, Any]:
    model = mcmc.kernel.model
    chains, draws = next(iter(samples.values())).shape[:2]
    out: dict[str, list] = {}
    for c in range(chains):
        for d in range(draws):
            values = {k: v[c, d] for k, v in samples.items()}
            with poutine.block():
                trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
                    *mcmc._args, **mcmc._kwargs
                )
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and site["is_observed"]:
                    lp = site["fn"].log_prob(site["value"])
                    out.setdefault(name, []).append(
                        scale_and_mask(lp, site["scale"], site["mask"])
                    )
    return {
        name: _numpy(torch.stack(lps).reshape((chains, draws) + lps[0].shape))
        for name, lps in out.items()
    }


def to_inference_data(mcmc, *, log_likelihood: bool = True):
    """The run of ``mcmc`` (a finished :class:`pyro.infer.MCMC`) as an
    ``arviz.InferenceData``, via ``arviz.from_dict`` (ArviZ 0.23 or 1.x).

    Examples
    --------
    >>> idata = to_inference_data(mcmc)  # doctest: +SKIP
    >>> arviz.summary(idata, var_names=["z"])  # doctest: +SKIP
    """
    import arviz as az

    samples = mcmc.get_samples(group_by_chain=True)
    chains, draws = next(iter(samples.values())).shape[:2]
    groups = {
        "posterior": {k: _numpy(v) for k, v in samples.items()},
        "sample_stats": {"diverging": _numpy(_diverging(mcmc, chains, draws))},
    }
    if log_likelihood:
        groups["log_likelihood"] = _log_likelihood(mcmc, samples)
    if int(az.__version__.split(".")[0]) >= 1:
        return az.from_dict(groups)
    return az.from_dict(**groups)
