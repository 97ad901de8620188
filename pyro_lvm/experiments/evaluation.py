r"""Dataset-level evaluation, written once for every model.

Per datapoint, in nats, averaged over the test split:

- ``test_nelbo``: minus the ELBO, :math:`-\frac1K\sum_k \log w^{(k)}` with the
  experiment's evaluation proposal (for MCMC-trained models a Gaussian fitted to MALA
  chains from the encoder, named under ``eval_proposal``);
- ``test_nll``: minus the importance-weighted bound :math:`\hat L_K` with the same
  :math:`K` samples (Burda et al. 2016);
- ``test_nelbo_fixed``, ``test_nll_fixed``: the same with the encoder's fixed proposal
  when the headline uses a refined one (the LAE paper's table metric is
  ``test_nelbo_fixed_per_dim``, with :math:`\mathcal N(\text{encoder}(x), 0.05^2 I)`);
- ``*_per_dim`` (nats per dimension) and ``*_bpd`` (bits per dimension);
- ``test_recon_mse``: squared error of the reconstruction at the encoder's point summary;
- ``test_nll_ais``: annealed importance sampling (Wu et al. 2017) when requested.

Data parallel (inside :func:`~pyro_lvm.collective.data_parallel`) each rank
evaluates its contiguous share of the test rows and the per-datapoint means are taken over
the union (sums and counts all-reduced): the same numbers as one process, up to the
Monte Carlo draws, in ``1/world_size`` of the time.
"""

from __future__ import annotations

import math

import torch

from pyro_lvm.collective import current_collective, global_mean, shard_bounds
from pyro_lvm.experiments.recipes.base import Experiment
from pyro_lvm.infer.importance import log_importance_weights

__all__ = ["evaluate"]


def _batches(x: torch.Tensor, batch_size: int):
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


def evaluate(
    experiment: Experiment,
    test_x: torch.Tensor,
    *,
    eval_samples: int = 1000,
    eval_ais: int = 0,
    batch_size: int = 100,
    chunk_size: int = 100,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Likelihood metrics of a trained experiment on ``test_x`` (see module docstring)."""
    lvm = experiment.lvm
    lvm.eval()
    data_dim = test_x.shape[1]
    full_x, test_x = test_x, _my_rows(test_x)
    options = dict(eval_samples=eval_samples, chunk_size=chunk_size, device=device)
    out = {"eval_samples": eval_samples}
    if "eval_proposal" in experiment.info:
        out["eval_proposal"] = experiment.info["eval_proposal"]
    out.update(_bounds(lvm, experiment.guide, test_x, batch_size, "", **options))
    if experiment.fixed_guide is not None:
        out.update(_bounds(lvm, experiment.fixed_guide, test_x, batch_size, "_fixed", **options))
    sq_err = []
    for x in _batches(test_x, batch_size):
        x = x.to(device)
        try:
            sq_err.append(((lvm.reconstruct(x) - x) ** 2).sum(-1))
        except (NotImplementedError, AttributeError):  # optional in the model protocol
            pass
    if sq_err:
        out["test_recon_mse"] = global_mean(torch.cat(sq_err)).item() / data_dim
    if eval_ais > 0:
        out.update(_ais(experiment, test_x, eval_ais, batch_size, device, data_dim))
    if experiment.extra_metrics is not None:  # model-specific: every rank, all rows
        out.update(experiment.extra_metrics(full_x.to(device)))
    lvm.train()
    return out


def _bounds(lvm, guide, test_x, batch_size, suffix, *, eval_samples, chunk_size, device):
    """``test_nelbo{suffix}`` and ``test_nll{suffix}`` (with units) for one proposal."""
    elbo, iwae = [], []
    for x in _batches(test_x, batch_size):
        log_w = log_importance_weights(
            lvm.model,
            guide,
            x.to(device),
            num_samples=eval_samples,
            max_plate_nesting=getattr(lvm, "max_plate_nesting", 1),
            chunk_size=chunk_size,
        )
        elbo.append(log_w.mean(0))
        iwae.append(log_w.logsumexp(0) - math.log(eval_samples))
    # data parallel: means over the union of the ranks' rows (one process: plain means)
    data_dim = test_x.shape[1]
    out = _with_units(f"test_nelbo{suffix}", -global_mean(_cat(elbo, test_x)).item(), data_dim)
    out.update(_with_units(f"test_nll{suffix}", -global_mean(_cat(iwae, test_x)).item(), data_dim))
    return out


def _my_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the rows (all of them in a single process)."""
    collective = current_collective()
    if collective is None:
        return x
    return x[slice(*shard_bounds(x.shape[0], collective.rank, collective.world_size))]


def _cat(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-datapoint values of this rank's batches (none: an empty share)."""
    return torch.cat(values) if values else like.new_zeros(0)


def _with_units(key: str, nats: float, data_dim: int) -> dict[str, float]:
    return {
        key: nats,
        f"{key}_per_dim": nats / data_dim,
        f"{key}_bpd": nats / data_dim / math.log(2),
    }


def _ais(experiment, test_x, num_steps, batch_size, device, data_dim) -> dict[str, float]:
    if not experiment.continuous_latents:
        raise ValueError("--eval-ais needs continuous latents; this model's are discrete")
    from pyro_lvm.infer.ais import ais_log_likelihood

    lvm = experiment.lvm
    estimates = [
        ais_log_likelihood(
            lvm.model,
            x.to(device),
            num_steps=num_steps,
            max_plate_nesting=getattr(lvm, "max_plate_nesting", 1),
        )
        for x in _batches(test_x, batch_size)
    ]
    nll = -global_mean(_cat(estimates, test_x)).item()
    return {"test_nll_ais": nll, "test_nll_ais_per_dim": nll / data_dim}
