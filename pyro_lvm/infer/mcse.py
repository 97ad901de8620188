r"""Judge MCMC draws against a reference sampler: ESS, Monte Carlo standard errors, z-scores.

For draws :math:`\theta^{(1..S)}` of one coordinate with effective sample size
:math:`S_{\rm eff}` (Geyer's initial monotone sequence estimator,
:func:`pyro.ops.stats.effective_sample_size`), the Monte Carlo standard error of the
posterior mean estimate is

.. math::

    \mathrm{MCSE}(\bar\theta) = \sqrt{\widehat{\mathrm{Var}}(\theta) / S_{\rm eff}} .

Two samplers of the same posterior (e.g. ALD and NUTS) then give, per coordinate, the
z-score of their mean estimates

.. math::

    z = \frac{\bar\theta_a - \bar\theta_b}
             {\sqrt{\mathrm{MCSE}_a^2 + \mathrm{MCSE}_b^2}},

approximately standard normal when both are right and their ESS estimates are honest:
over :math:`K` coordinates, :math:`\max|z|` above about
:math:`\Phi^{-1}(1 - 0.005/K)` (3.9 for :math:`K = 100`) says one of them is wrong (or
its ESS overstated), not merely slow.

The estimator is Pyro's, with Stan's bound :math:`S_{\rm eff} \le S \log_{10} S` (the
raw estimate can be negative on short antithetic chains), computed with :func:`torch.cummin` where
:func:`pyro.ops.stats.effective_sample_size` builds an ``(S/2) x (S/2)`` matrix per
coordinate (32 GB for 20,000 draws of 40 coordinates); the two agree to rounding (tested).

A coordinate whose draws are all equal (a chain that never moved) gets
:math:`S_{\rm eff} = 1` by convention (one distinct value), where the estimator itself
would divide zero by zero. Draws with NaN are refused.

References
----------
Geyer (1992), "Practical Markov chain Monte Carlo", Statistical Science 7(4).
Vehtari, Gelman, Simpson, Carpenter, Bürkner (2021), "Rank-normalization, folding, and
localization: an improved R-hat for assessing convergence of MCMC", Bayesian Analysis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from pyro.ops.stats import autocovariance
from torch import Tensor

__all__ = [
    "DrawSummary",
    "DrawComparison",
    "effective_sample_size",
    "summarize_draws",
    "mean_z_scores",
    "compare_draws",
    "max_z_threshold",
]


def _chains_first(draws: Tensor, chains: bool) -> Tensor:
    """``(C, S, ...)``: a leading chain dimension added for one chain."""
    if not torch.is_tensor(draws) or not draws.is_floating_point():
        raise ValueError(f"draws must be a floating-point tensor, got {type(draws).__name__}")
    draws = draws if chains else draws.unsqueeze(0)
    if draws.dim() < 2 or draws.shape[1] < 4:
        raise ValueError(
            f"need at least 4 draws per chain along the sample dimension, got shape "
            f"{tuple(draws.shape)} (chains={chains}); pass (S, ...) or (C, S, ...) with chains"
        )
    if torch.isnan(draws).any():
        raise ValueError("the draws contain NaN; a sampler that produced NaN cannot be judged")
    return draws


def effective_sample_size(draws: Tensor, *, chains: bool = False) -> Tensor:
    """Effective sample size of every coordinate.

    Parameters
    ----------
    draws : Tensor
        ``(S, *shape)`` draws of one chain, or ``(C, S, *shape)`` with ``chains=True``.

    Returns
    -------
    Tensor
        Shape ``shape``; coordinates that never moved get 1 (see the module docstring).
    """
    x = _chains_first(draws, chains).double()
    constant = (x == x[:1, :1]).flatten(0, 1).all(0)
    ess = _geyer_ess(x.transpose(0, 1))
    return torch.where(constant, torch.ones_like(ess), ess).to(draws.dtype)


def _geyer_ess(x: Tensor) -> Tensor:
    """:func:`pyro.ops.stats.effective_sample_size` of ``x`` shaped ``(S, C, ...)``
    (Geyer's initial monotone sequence; Stan's multi-chain autocorrelation)."""
    n, c = x.shape[0], x.shape[1]
    gamma = autocovariance(x, dim=0).mean(1)  # (S, ...): mean over chains
    var_within = x.var(0).mean(0)
    var_estimator = (n - 1) / n * var_within
    if c > 1:
        var_estimator = var_estimator + x.mean(0).var(0)
    else:
        var_within = var_estimator  # rho_k is the autocorrelation for one chain
    rho = (var_estimator - var_within + gamma) / var_estimator
    rho[0] = 1
    rho = rho if n % 2 == 0 else rho[:-1]
    pairs = rho.reshape((n // 2, 2) + rho.shape[1:]).sum(1)
    tau = -1 + 2 * pairs[0]
    if pairs.shape[0] > 1:
        tau = tau + 2 * torch.cummin(pairs[1:].clamp(min=0), dim=0).values.sum(0)
    # Stan's bound: tau >= 1 / log10(C n), i.e. ESS <= C n log10(C n); on short,
    # antithetic chains the raw estimate can be zero or negative
    return c * n / tau.clamp(min=1 / math.log10(c * n))


class DrawSummary(NamedTuple):
    """Per-coordinate summary of MCMC draws (tensors of the coordinates' shape).

    Attributes
    ----------
    mean, std : Tensor
        Sample mean and standard deviation over all draws (chains pooled).
    ess : Tensor
        Effective sample size.
    mcse : Tensor
        Monte Carlo standard error of ``mean``, ``std / sqrt(ess)``.
    num_draws : int
        Draws per coordinate (all chains).
    """

    mean: Tensor
    std: Tensor
    ess: Tensor
    mcse: Tensor
    num_draws: int


def summarize_draws(draws: Tensor, *, chains: bool = False) -> DrawSummary:
    """Mean, standard deviation, ESS and the MCSE of the mean of every coordinate.

    ``draws``: ``(S, *shape)``, or ``(C, S, *shape)`` with ``chains=True``.
    """
    x = _chains_first(draws, chains)
    flat = x.flatten(0, 1).double()
    ess = effective_sample_size(x, chains=True).double()
    std = flat.std(0)
    dtype = draws.dtype
    return DrawSummary(
        flat.mean(0).to(dtype),
        std.to(dtype),
        ess.to(dtype),
        (std / ess.sqrt()).to(dtype),
        flat.shape[0],
    )


def mean_z_scores(summary: DrawSummary, reference: DrawSummary) -> Tensor:
    """``(mean - reference.mean) / sqrt(mcse^2 + reference.mcse^2)`` per coordinate
    (0 where both means and both errors are exactly equal, e.g. a fixed coordinate)."""
    diff = summary.mean - reference.mean
    se = (summary.mcse.square() + reference.mcse.square()).sqrt()
    z = diff / se
    return torch.where((diff == 0) & (se == 0), torch.zeros_like(z), z)


class DrawComparison(NamedTuple):
    """How draws compare with reference draws of the same posterior.

    Attributes
    ----------
    min_ess : float
        Smallest ESS over the compared coordinates of every site.
    min_ess_per_draw : float
        ``min_ess`` divided by the number of draws.
    max_abs_z : float
        Largest :math:`|z|` of the posterior means (:func:`mean_z_scores`).
    frac_abs_z_above_3 : float
        Fraction of compared coordinates with :math:`|z| > 3`.
    num_coordinates : int
        Coordinates compared (after ``select``).
    z : dict
        Site -> z-scores of all its coordinates (unselected ones included).
    summaries : dict
        Site -> ``(DrawSummary of draws, DrawSummary of reference)``.
    """

    min_ess: float
    min_ess_per_draw: float
    max_abs_z: float
    frac_abs_z_above_3: float
    num_coordinates: int
    z: dict[str, Tensor]
    summaries: dict[str, tuple[DrawSummary, DrawSummary]]


def compare_draws(
    draws: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    *,
    chains: bool = False,
    reference_chains: bool = False,
    select: Mapping[str, Tensor] | None = None,
) -> DrawComparison:
    """Compare the posterior means of ``draws`` with those of ``reference``, site by site.

    Parameters
    ----------
    draws, reference : mapping
        Site name -> draws ``(S, *shape)`` (or ``(C, S, *shape)`` with ``chains`` /
        ``reference_chains``), e.g. ``mcmc.get_samples()`` of two samplers. Every site of
        ``draws`` must be in ``reference`` with the same ``shape``.
    select : mapping, optional
        Site -> boolean tensor broadcastable to ``shape``: the coordinates to compare
        (e.g. leave out masked, flat latents, whose "posterior" is improper). Default all.

    Returns
    -------
    DrawComparison
    """
    if not draws:
        raise ValueError("no sites to compare: draws is empty")
    missing = [name for name in draws if name not in reference]
    if missing:
        raise ValueError(f"reference lacks sites {missing}; draw them with the reference sampler")
    z, summaries, ess_all, z_all = {}, {}, [], []
    num_draws = None
    for name, value in draws.items():
        a = summarize_draws(value, chains=chains)
        b = summarize_draws(reference[name], chains=reference_chains)
        if a.mean.shape != b.mean.shape:
            raise ValueError(
                f"site {name!r} has shape {tuple(a.mean.shape)} in draws but "
                f"{tuple(b.mean.shape)} in the reference"
            )
        z[name] = mean_z_scores(a, b)
        summaries[name] = (a, b)
        keep = torch.ones_like(a.mean, dtype=torch.bool)
        if select is not None and name in select:
            keep = keep & torch.as_tensor(select[name], dtype=torch.bool, device=keep.device)
        ess_all.append(a.ess[keep])
        z_all.append(z[name][keep])
        num_draws = a.num_draws
    ess, zs = torch.cat(ess_all), torch.cat(z_all)
    if not zs.numel():
        raise ValueError("select leaves no coordinate to compare")
    min_ess = float(ess.min())
    return DrawComparison(
        min_ess=min_ess,
        min_ess_per_draw=min_ess / num_draws,
        max_abs_z=float(zs.abs().max()),
        frac_abs_z_above_3=float((zs.abs() > 3).double().mean()),
        num_coordinates=int(zs.numel()),
        z=z,
        summaries=summaries,
    )


def max_z_threshold(num_coordinates: int, level: float = 0.01) -> float:
    r"""The :math:`|z|` that the largest of ``num_coordinates`` independent standard
    normal z-scores exceeds with probability ``level``:
    :math:`\Phi^{-1}(1 - \tfrac12(1 - (1 - \text{level})^{1/K}))`."""
    if num_coordinates < 1 or not 0 < level < 1:
        raise ValueError("need num_coordinates >= 1 and 0 < level < 1")
    tail = 0.5 * (1 - (1 - level) ** (1 / num_coordinates))
    return math.sqrt(2) * float(
        torch.special.erfinv(torch.tensor(1 - 2 * tail, dtype=torch.float64))
    )
