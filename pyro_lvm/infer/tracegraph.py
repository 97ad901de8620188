r"""Pyro's :class:`~pyro.infer.TraceGraph_ELBO`, unchanged, as a differentiable loss.

Pyro's estimator only offers ``loss_and_grads`` (it calls ``backward`` itself) and reads
baseline options from each guide site's ``infer={"baseline": {...}}`` dict. This adapter
adds :meth:`~DifferentiableTraceGraph_ELBO.differentiable_loss` (the value is minus the
ELBO, the gradient is Pyro's surrogate's) and optionally switches on Pyro's decaying
average baseline for every non-reparameterized guide site, so Pyro's estimator can be
compared with :class:`~pyro_lvm.infer.TraceNVIL_ELBO` under the same driver
(:class:`~pyro_lvm.infer.ModuleSVI`). Pyro's behaviour is kept as is, including its
known defects: the decaying average lives in the global param store with the batch's
shape (one slot per batch position, not per datapoint; a different batch size raises an
error unless ``reset_on_resize``), and baseline targets include the subsample scale.
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceGraph_ELBO

__all__ = ["DifferentiableTraceGraph_ELBO"]


class DifferentiableTraceGraph_ELBO(TraceGraph_ELBO):
    """:class:`pyro.infer.TraceGraph_ELBO` with ``differentiable_loss``.

    Parameters
    ----------
    decaying_avg_baseline : bool
        Give every non-reparameterized guide site Pyro's decaying-average baseline
        (``use_decaying_avg_baseline=True``).
    baseline_beta : float
        Its decay (Pyro's default 0.9).
    reset_on_resize : bool
        Restart a decaying average whose shape no longer matches the batch (e.g. a
        smaller last batch of an epoch) instead of letting Pyro raise.
    **kwargs
        Passed to :class:`~pyro.infer.TraceGraph_ELBO` (``num_particles``, ...).
    """

    def __init__(
        self,
        decaying_avg_baseline: bool = False,
        baseline_beta: float = 0.9,
        reset_on_resize: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.decaying_avg_baseline, self.baseline_beta = decaying_avg_baseline, baseline_beta
        self.reset_on_resize = reset_on_resize

    def _infer_config(self, msg) -> dict:
        if (
            self.decaying_avg_baseline
            and msg["type"] == "sample"
            and not msg["is_observed"]
            and not getattr(msg["fn"], "has_rsample", False)
            and "baseline" not in msg["infer"]
        ):
            return {
                "baseline": {
                    "use_decaying_avg_baseline": True,
                    "baseline_beta": self.baseline_beta,
                }
            }
        return {}

    def _get_trace(self, model, guide, args, kwargs):
        guide = poutine.infer_config(guide, self._infer_config)
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if self.reset_on_resize:
            store = pyro.get_param_store()
            for name, site in guide_trace.nodes.items():
                key = "__baseline_avg_downstream_cost_" + name
                if site["type"] == "sample" and key in store:
                    if store[key].shape != site["log_prob"].shape:
                        del store[key]  # Pyro would raise: restart the average
        return model_trace, guide_trace

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Minus the ELBO estimate, with Pyro's TraceGraph gradient."""
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -torch.as_tensor(elbo).detach() + (surrogate_loss - surrogate_loss.detach())
