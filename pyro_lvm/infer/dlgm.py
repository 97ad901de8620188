r"""Hoffman (2017): a VAE encoder initialises short-run Langevin chains on each latent.

For a batch :math:`x_{1..B}`:

1. The encoder :math:`q_\phi(z \mid x)` (a reparameterized guide) gives the ELBO
   :math:`\mathcal L(\phi, \theta) = \sum_i \mathbb E_q[\log p_\theta(x_i, z) -
   \log q_\phi(z \mid x_i)]` from one sample :math:`z^{(0)}_i`.
2. :math:`T` Langevin steps on each :math:`z_i` separately (potential
   :math:`-\log p_\theta(x_i, z)`, prior included) start at the *detached*
   :math:`z^{(0)}_i` and end at :math:`z^{(T)}_i`; unadjusted (ULA) with
   :math:`\eta = 0.005` by default as in the authors' code, optionally MALA and adapted.
3. The decoder :math:`\theta` descends :math:`-\sum_i \log p_\theta(x_i, z^{(T)}_i)`;
   the encoder :math:`\phi` descends :math:`-\mathcal L` (only its gradient with respect
   to :math:`\phi`; the ELBO's decoder gradient is discarded).

The chain restarts from the encoder at every step (unlike the LAE, whose chain persists).
The decoder thus learns from samples closer to the true posterior than the encoder's,
while the encoder stays an ordinary amortized posterior (used to evaluate the model).

``accept_rate`` is the MALA acceptance probability :math:`\min(1, a)` of the Langevin
proposals, also for ULA, where it is a diagnostic of the discretization error (1 would be
exact) and what step-size adaptation tracks.

References
----------
Hoffman (2017), "Learning deep latent Gaussian models with Markov chain Monte Carlo",
ICML.
Taniguchi et al. (2022), "Langevin Autoencoders for Learning Deep Latent Variable
Models", NeurIPS (the baseline's settings).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyro_lvm.infer.diagnostics import check_loss
from pyro_lvm.infer.driver import OptimizerDriver
from pyro_lvm.infer.mcmc.adaptation import (
    DualAveragingState,
    check_step_options,
    dual_averaging_init,
    dual_averaging_step,
)
from pyro_lvm.infer.mcmc.langevin import LangevinState, langevin_step
from pyro_lvm.infer.sites import (
    LatentsCache,
    log_densities,
    pack,
    trace_log_densities,
)

__all__ = ["DLGM"]


class DLGM(OptimizerDriver):
    """SVI-like driver of the Hoffman (2017) baseline: ``step(x) -> float``.

    Parameters
    ----------
    model : callable
        Pyro model ``model(x)`` with real-valued latent site(s) in a data plate.
    guide : callable
        Reparameterized Pyro guide ``guide(x)`` over the same latent sites (the encoder).
    optim : torch.optim.Optimizer
        Optimizer over the model's and the guide's parameters.
    num_steps : int
        Langevin steps :math:`T` per batch (default 2).
    step_size : float
        Langevin step size :math:`\\eta` (initial value when adapting).
    mh : bool
        Metropolis-Hastings correction (default off, as in Hoffman's code).
    adapt_step_size : bool
        Adapt one global step size by dual averaging (bounded memory ``adapt_window``
        steps) so the MALA acceptance probability tracks ``target_accept_prob``.
    guide_params : iterable of Tensor, optional
        The encoder's parameters (trained on the ELBO). Default: the optimizer's parameters
        that :math:`\\log q` depends on, found at the first step.
    clip_norm : float, optional
        Clip the global gradient norm before each step.
    """

    #: data parallel is refused (:func:`~pyro_lvm.experiments.fabric.check_data_parallel`):
    #: each process would adapt the shared step size from its own shard's acceptances
    data_parallel_rng = None
    data_parallel_refusal = (
        "each process would adapt the Langevin step size from its own acceptances, so the "
        "processes' step sizes would drift apart"
    )

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: torch.optim.Optimizer,
        *,
        num_steps: int = 2,
        step_size: float = 0.005,
        mh: bool = False,
        adapt_step_size: bool = False,
        target_accept_prob: float = 0.574,
        adapt_window: int = 100,
        latent_site: str | Sequence[str] | None = None,
        guide_params: Iterable[torch.Tensor] | None = None,
        max_plate_nesting: int = 1,
        clip_norm: float | None = None,
    ):
        check_step_options(
            num_steps=num_steps, step_size=step_size, target_accept_prob=target_accept_prob
        )
        super().__init__(optim, clip_norm)
        self.model, self.guide = model, guide
        self.num_steps, self.mh = num_steps, mh
        self.target_accept_prob, self.adapt_window = target_accept_prob, adapt_window
        self.adapt_step_size = adapt_step_size
        self.latent_site, self.max_plate_nesting = latent_site, max_plate_nesting
        self.step_size = float(step_size)
        self._adapt: DualAveragingState | None = (
            dual_averaging_init(step_size) if adapt_step_size else None
        )
        self._guide_params = list(guide_params) if guide_params is not None else None
        self._spec = LatentsCache(model, latent_site, max_plate_nesting)
        self._last = {"accept_rate": float("nan"), "step_size": self.step_size}

    # -- helpers ----------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return self._optimizer.torch_params()

    def _elbo_traces(self, x: torch.Tensor):
        guide_trace = poutine.trace(self.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(x)
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if not site["fn"].has_rsample:
                raise ValueError(
                    f"guide site {name!r} is not reparameterizable; DLGM needs a "
                    "reparameterized (e.g. Normal) encoder"
                )
        elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
        return guide_trace, model_trace, -elbo

    def _find_guide_params(self, guide_trace) -> list[torch.Tensor]:
        params = [p for p in self._params() if p.requires_grad]
        log_q = guide_trace.log_prob_sum()
        grads = torch.autograd.grad(log_q, params, retain_graph=True, allow_unused=True)
        found = [p for p, g in zip(params, grads) if g is not None]
        if not found:
            raise ValueError(
                "none of the optimizer's parameters enter the guide; pass the encoder's "
                "parameters to the optimizer (or guide_params=...)"
            )
        return found

    @staticmethod
    def _initial_state(spec, guide_trace, model_trace) -> LangevinState:
        # the ELBO's model trace already holds log p(x, z_0): differentiate it with respect
        # to the guide's sample instead of evaluating the model again at z_0
        values = [guide_trace.nodes[n]["value"] for n in spec.names]
        log_prior, log_lik = trace_log_densities(model_trace, spec)
        joint = log_prior + log_lik
        grads = torch.autograd.grad(joint.sum(), values, retain_graph=True)
        position = pack(spec, {n: v.detach() for n, v in zip(spec.names, values)})
        grad = pack(spec, dict(zip(spec.names, grads)))
        return LangevinState(position, -joint.detach(), -grad.detach())

    # -- the Inference protocol ---------------------------------------------------------
    def step(self, x: torch.Tensor) -> float:
        """One update; returns minus the ELBO summed over the batch (before the update)."""
        return float(self._descend(lambda: self._losses(x), ((x,), {})))

    def _losses(self, x: torch.Tensor):
        """The reported loss (minus the ELBO) and the backward of the two objectives."""
        spec = self._spec(x)
        with poutine.block():
            guide_trace, model_trace, encoder_loss = self._elbo_traces(x)
            check_loss(encoder_loss)
            if self._guide_params is None:
                self._guide_params = self._find_guide_params(guide_trace)
            state = self._initial_state(spec, guide_trace, model_trace)

            def potential(position: torch.Tensor) -> torch.Tensor:
                log_prior, log_lik = log_densities(self.model, spec, position, x)
                return -(log_prior + log_lik)

            eta = self.step_size
            accept = []
            for t in range(self.num_steps):
                last = t == self.num_steps - 1
                state, info = langevin_step(
                    state, potential, eta, mh=self.mh, event_dim=1, keep_graph=last
                )
                accept_prob = info.log_accept_ratio.clamp(max=0.0).exp().mean()
                accept.append(float(accept_prob))
                if self._adapt is not None:
                    self._adapt, eta = dual_averaging_step(
                        self._adapt, accept_prob, self.target_accept_prob, max_t=self.adapt_window
                    )
                    eta = float(eta)
            # the kept graph of the last proposal serves every chain that accepted it; a
            # rejected chain's potential has no graph, so recompute in that case
            decoder_loss = state.potential
            if not bool(info.accepted.all()) or not decoder_loss.requires_grad:
                decoder_loss = potential(state.position)
            decoder_loss = decoder_loss.sum()
            check_loss(decoder_loss, "Langevin potential")
        self.step_size = eta
        self._last = {"accept_rate": sum(accept) / len(accept), "step_size": eta}
        return encoder_loss, lambda: self._backward(decoder_loss, encoder_loss)

    def _backward(self, decoder_loss: torch.Tensor, encoder_loss: torch.Tensor) -> None:
        # the decoder learns from z_T (detached: no gradient reaches the encoder here) ...
        decoder_loss.backward()
        # ... the encoder from the ELBO, whose decoder gradient is discarded
        enc_grads = torch.autograd.grad(encoder_loss, self._guide_params, allow_unused=True)
        for p, g in zip(self._guide_params, enc_grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    @torch.no_grad()
    def evaluate_loss(self, x: torch.Tensor) -> float:
        """Minus the single-sample ELBO summed over the batch, without an update."""
        with poutine.block():
            return self._elbo_traces(x)[2].item()

    def _extra_state(self) -> dict:
        return {
            "step_size": self.step_size,
            "adapt": None if self._adapt is None else self._adapt._asdict(),
            "last": dict(self._last),
        }

    def _load_extra_state(self, state: dict) -> None:
        self.step_size = float(state["step_size"])
        adapt = state.get("adapt")
        self._adapt = None if adapt is None else DualAveragingState(**adapt)
        self._last = dict(state.get("last", self._last))

    def metrics(self) -> dict[str, float]:
        """``accept_rate`` (mean MALA acceptance probability of the last batch's Langevin
        steps) and ``step_size``."""
        return dict(self._last)
