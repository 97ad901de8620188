r"""Langevin autoencoders: train a decoder with amortized Langevin dynamics (ALD).

:class:`LAE` is an SVI-like driver for Algorithm 2 of Taniguchi et al. (2022). On each
minibatch :math:`x_1, \dots, x_n` it

1. computes the encoder trunk features :math:`g(x_i; \psi)` once,
2. runs :math:`T` MALA transitions of the chain :math:`\Phi` (the weight of the encoder's
   final linear layer; see :class:`~pyro_lvm.infer.mcmc.amortized_langevin.AmortizedLangevin`),
   the step size adapting towards the target acceptance throughout training,
3. takes one optimizer step on every other parameter (decoder :math:`\theta`, likelihood
   scale, encoder trunk :math:`\psi` and the final layer's bias) on the mean potential at
   the :math:`T` chain states after each transition,

.. math::

    \mathcal L(\theta, \psi) = \frac1T \sum_{t=1}^T V_t, \qquad
    V_t = -\sum_{i=1}^n \log p_\theta\bigl(x_i, z_i = \Phi_t\, g(x_i; \psi) + b\bigr),

with :math:`\Phi_t` held constant. :math:`\Phi` never gets an optimizer step; the chain
persists across minibatches.

**Data parallel** (:mod:`pyro_lvm.collective`): each rank holds a shard of the
batch; the kernel sums the potential and its gradient over ranks, every rank draws the
same proposal noise and MH uniform from the global generator (in the same state on every
rank), so all ranks take the same accept decision and step-size update, and the decoder
and trunk gradients are summed before the optimizer step: the run is a single process on
the union batch, up to the order of float additions.

**Temperature.** :math:`V` is the plain minibatch sum (temperature 1), as in the paper;
the returned loss is therefore a batch-summed :math:`-\log p(x, z)` like
:class:`~pyro_lvm.infer.svi.ModuleSVI`'s negative ELBO (which lacks the entropy term).

**Cost.** Every potential is evaluated once, with its graph to :math:`\theta, \psi`
kept: the Metropolis-Hastings test of a proposal needs :math:`V(\Phi')`, and the graph of
whichever state the chain holds after each transition (the accepted proposal or the kept
state) is the one backpropagated for the update; the trunk runs once per minibatch. A
step costs :math:`T + 1` decoder passes plus one backward pass through the selected graphs.

References
----------
Taniguchi, Iwasawa, Kumagai, Matsuo (2022), "Langevin Autoencoders for Learning Deep
Latent Variable Models", NeurIPS, Algorithm 2.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from pyro.optim import PyroOptim
from torch import nn

from pyro_lvm.collective import reduce_potential
from pyro_lvm.infer.driver import OptimizerDriver
from pyro_lvm.infer.mcmc import ald
from pyro_lvm.infer.mcmc.amortized_langevin import AmortizedLangevin
from pyro_lvm.infer.mcmc.mixing import move_and_spread
from pyro_lvm.infer.trunk_jacobian import jacobian_term

__all__ = ["LAE"]

#: dual-averaging memory (steps) while training: the target moves with the decoder
DEFAULT_ADAPT_WINDOW = 1000
#: number of latest transitions averaged by :meth:`LAE.metrics`
METRICS_WINDOW = 100


def _latents(langevin, batch) -> dict[str, torch.Tensor]:
    """The local sites' (unconstrained) values at the state, without a graph."""
    with torch.no_grad():
        return batch.chain.local_values(langevin.position[: batch.chain_size])


class LAE(OptimizerDriver):
    r"""SVI-like trainer for a Langevin autoencoder.

    Parameters
    ----------
    model : callable
        Pyro model ``model(x)`` with continuous latent sites inside a full-size data plate.
    encoder : nn.Module
        Deterministic encoder ``x -> z`` (see
        :class:`~pyro_lvm.infer.mcmc.amortized_langevin.AmortizedLangevin` for the outputs
        it may return and which of its parameters form the chain).
    optim : torch.optim.Optimizer or pyro.optim.PyroOptim
        Optimizer over the parameters to train (model and encoder). The chain parameters
        are **removed** from its parameter groups on the first batch (they move only by
        MCMC), so ``Adam([*model.parameters(), *encoder.parameters()])`` is fine. The Pyro
        params the model uses (``pyro.param``, ``pyro.module``) are trained too (see
        :class:`~pyro_lvm.infer.optim.ParamOptimizer`).
    num_steps : int
        Kernel transitions :math:`T` per minibatch (the paper's default is 2).
    kernel : AmortizedLangevin, optional
        A ready kernel (then ``kernel_options`` must be empty).
    clip_norm : float, optional
        Clip the global gradient norm of the optimizer's parameters.
    jacobian : bool
        Correct the trunk's gradient for the Jacobian of the chain layer (the weight
        :math:`\Phi \mapsto z`), which otherwise rewards the trunk for shrinking its
        features until the chain freezes and training becomes MAP
        (:mod:`~pyro_lvm.infer.trunk_jacobian`). Applies where the chain is the weight of
        ``nn.Linear`` layers fed by a trained trunk and ``precondition`` is ``None`` (the
        training default); the loss value is unchanged. Default on.
    **kernel_options
        Passed to :class:`~pyro_lvm.infer.mcmc.amortized_langevin.AmortizedLangevin`.
        Training defaults differ from the kernel's: ``adapt_window=1000`` (the step size
        keeps tracking the target acceptance while the decoder changes) and
        ``precondition=None`` (the paper's chain on the weights, which the Jacobian
        correction makes stable; preconditioned training collapsed on Pyro's DMM, see
        ``docs/langevin.md``, "Training defaults").
    """

    loss_name = "LAE potential"
    #: data parallel: the chain's random draws are shared by every rank (the global
    #: generator, in the same state everywhere; see :mod:`pyro_lvm.collective`);
    #: the potentials are summed over ranks in the kernel, so the loss is already global
    data_parallel_rng = "shared"
    loss_is_global = True

    def __init__(
        self,
        model: Callable,
        encoder: nn.Module,
        optim: torch.optim.Optimizer | PyroOptim,
        *,
        num_steps: int = 2,
        kernel: AmortizedLangevin | None = None,
        clip_norm: float | None = None,
        jacobian: bool = True,
        **kernel_options: Any,
    ):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps (T) must be a positive integer, got {num_steps}")
        if kernel is None:
            kernel_options.setdefault("adapt_window", DEFAULT_ADAPT_WINDOW)
            kernel_options.setdefault("precondition", None)
            # data parallel: potential and gradient summed over ranks (identity otherwise)
            kernel_options.setdefault("reduce_fn", reduce_potential)
            kernel = AmortizedLangevin(model, encoder, **kernel_options)
        elif kernel_options:
            raise ValueError(
                f"got a kernel and kernel options {sorted(kernel_options)}; configure the "
                "kernel itself"
            )
        self.model, self.encoder = model, encoder
        self.kernel, self.num_steps = kernel, num_steps
        self.jacobian = bool(jacobian)
        self._jacobian_warned = False
        super().__init__(optim, clip_norm, extra=dict(encoder.named_parameters()))
        if kernel.cache.spec is not None:
            self._exclude_more(kernel.cache.spec.params)
        # (accept_prob, step_size, squared move, squared spread) of the latest transitions
        self._recent: deque[tuple[float, ...]] = deque(maxlen=METRICS_WINDOW)

    def _params(self) -> list[torch.Tensor]:
        """The parameters a torch optimizer holds."""
        return self._optimizer.torch_params()

    def step(self, *args, **kwargs) -> float:
        """``T`` transitions, then one optimizer step; returns the mean batch-summed
        potential :math:`\\frac1T\\sum_t V_t`."""
        return float(self._descend(lambda: self._transitions(args, kwargs), (args, kwargs)))

    def _transitions(self, args, kwargs) -> torch.Tensor:
        """Run the ``T`` transitions on the batch; the mean potential, graph kept."""
        kernel = self.kernel
        x = kernel.input_of(args, kwargs)
        spec = kernel.chain_spec(x)
        self._exclude_more(spec.params)  # found on the first batch: never stepped
        batch = kernel.bind(*args, keep_graph=True, **kwargs)
        langevin = ald.ald_init(batch, kernel.state, keep_graph=True, reduce_fn=kernel.reduce_fn)
        kernel.check(batch, langevin, x)
        kernel.start(batch, langevin)
        state = kernel.state
        potentials, stats, moves = [], [], []
        before = _latents(langevin, batch)
        for _ in range(self.num_steps):
            langevin, info = ald.ald_transition(
                langevin,
                batch,
                state.step_size,
                mh=kernel.mh,
                keep_graph=True,
                generator=kernel.generator,
                reduce_fn=kernel.reduce_fn,
            )
            eta = state.step_size
            state = state._replace(t=state.t + 1)
            if kernel.adapt_step_size:
                state = ald.ald_adapt(
                    state,
                    info.accept_prob,
                    kernel.target_accept_prob,
                    adapt_window=kernel.adapt_window,
                )
            potentials.append(langevin.potential)
            after = before if info.accepted is False else _latents(langevin, batch)
            moves.append(move_and_spread(before, after))
            stats.append((float(info.accept_prob), eta))
            before = after
        squares = torch.stack(moves).sqrt().tolist()  # one host read for all T transitions
        self._recent.extend((*s, *m) for s, m in zip(stats, squares))
        held = ald.write_back(langevin, batch, spec.params)
        kernel.state = state if held is None else state._replace(globals=held)
        # a state kept over several transitions appears several times: autograd sums
        # its gradient and traverses its graph once
        total = potentials[0]
        for potential in potentials[1:]:
            total = total + potential
        return total / self.num_steps + self._jacobian_term(batch.chain, spec)

    def _jacobian_term(self, chain, spec) -> torch.Tensor | float:
        r"""The trunk's Jacobian correction (:mod:`~pyro_lvm.infer.trunk_jacobian`) on the
        chain layers' inputs; not applied to a preconditioned chain (its volume factor
        :math:`\det(G G^\top (G G^\top + \lambda \bar e I)^{-1})` is left uncorrected)
        nor to an encoder re-run per proposal."""
        if not self.jacobian:
            return 0.0
        if self.kernel.precondition is not None:
            self._skip_jacobian(
                f"precondition={self.kernel.precondition}; pass precondition=None to correct"
            )
            return 0.0
        if chain.features is None:
            self._skip_jacobian(
                "an encoder re-run per proposal; make the chain an nn.Linear's weight to correct"
            )
            return 0.0
        columns = [sum(b - a for a, b in head.sites.values()) for head in spec.heads]
        return jacobian_term(chain.features, columns)

    def _skip_jacobian(self, why: str) -> None:
        if not self._jacobian_warned:  # once per trainer: it holds for every batch
            self._jacobian_warned = True
            warnings.warn(
                f"LAE: jacobian=True does not apply with {why} the trunk's gradient, or "
                "pass jacobian=False to train without the correction",
                RuntimeWarning,
                stacklevel=5,
            )

    @torch.no_grad()
    def evaluate_loss(self, *args, **kwargs) -> float:
        """The batch-summed potential :math:`V` at the current chain state (no update)."""
        return float(self.kernel.potential(*args, **kwargs))

    def metrics(self) -> dict[str, float]:
        """Over the latest transitions (at most ``METRICS_WINDOW``): the mean acceptance
        probability (a Rao-Blackwellized acceptance rate), the step size, ``move`` (the
        root-mean-square change of the latents per transition, 0 for a rejection) and
        ``move_ratio`` (``move`` over the latents' spread across datapoints); reading
        them changes nothing, so a progress bar may call this every step."""
        if not self._recent:
            return {"accept_rate": float("nan"), "step_size": float("nan")}
        accept, step, move, spread = (sum(c) / len(c) for c in zip(*self._recent))
        ratio = move / spread if spread > 0 else float("nan")
        return {"accept_rate": accept, "step_size": step, "move": move, "move_ratio": ratio}

    def _extra_state(self) -> dict[str, Any]:
        """Kernel adaptation state (the chain itself is an encoder parameter)."""
        return {"kernel": self.kernel.state_dict(), "recent": list(self._recent)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        # the chain parameters had left the optimizer when the checkpoint was written:
        # leave them out before the optimizer's state (saved without them) is loaded
        named = dict(self.encoder.named_parameters())
        names = state["kernel"].get("param_names") or []
        self._exclude_more([named[n] for n in names if n in named])
        self.kernel.load_state_dict(state["kernel"])
        recent = [tuple(r) for r in state.get("recent", []) if len(r) == 4]
        self._recent = deque(recent, maxlen=METRICS_WINDOW)
