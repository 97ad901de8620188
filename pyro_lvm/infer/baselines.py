r"""Typed baselines for score-function (REINFORCE) gradient estimators.

A score-function estimator of :math:`\nabla_\phi\,\mathbb E_{q_\phi(z)}[f(z)]` multiplies
the score :math:`\nabla_\phi \log q_\phi(z)` by a *learning signal* :math:`\ell = f(z)`.
Subtracting a baseline :math:`b` that does not depend on :math:`z` leaves the expectation
unchanged, because :math:`\mathbb E_q[\nabla_\phi \log q_\phi(z)] = 0`:

.. math::

    \mathbb E_q\big[(\ell - b)\,\nabla_\phi \log q_\phi(z)\big]
    = \mathbb E_q\big[\ell\,\nabla_\phi \log q_\phi(z)\big],

while a good :math:`b \approx \mathbb E[\ell \mid x]` removes most of the variance.

Each class below is one piece of the NVIL recipe (Mnih & Gregor 2014) and is an
:class:`torch.nn.Module`, so its state (running averages, network weights) is saved by
``state_dict`` and restored by ``load_state_dict``. Pieces are *combined* by listing them
for a site; each additive baseline is fitted to the residual the previous ones leave,
and :class:`SignalNormalization` (if present) divides what is left:

.. math::

    \tilde\ell = \frac{\ell - b_1 - b_2 - \dots}{\max(1, \sqrt{v})} .

Baselines update their state only in training mode (``module.train()``, the default);
call ``.eval()`` to freeze them, e.g. to measure gradient variance at fixed parameters.
Every prediction uses the state *before* the current batch, so the estimate stays
unbiased.

References
----------
Mnih, Gregor (2014), "Neural Variational Inference and Learning in Belief Networks", ICML.
Williams (1992), "Simple statistical gradient-following algorithms for connectionist
reinforcement learning", Machine Learning.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from pyro.ops.provenance import detach_provenance
from torch import nn

from pyro_lvm.collective import all_gather_cat, current_collective, global_mean

__all__ = [
    "Baseline",
    "BaselineContext",
    "ConstantBaseline",
    "NeuralBaseline",
    "RunningAverageBaseline",
    "SignalNormalization",
]


class BaselineContext(NamedTuple):
    """What a baseline may look at when predicting the learning signal of one site.

    Attributes
    ----------
    site : str
        Name of the guide sample site.
    data_dim : int or None
        Dimension (negative) of the data plate in the signal, ``None`` if the site is
        outside the data plate.
    indices : Tensor or None
        Dataset row indices of the batch (the data plate's subsample indices).
    args : tuple
        Positional arguments of the model and guide (``args[0]`` is the data batch).
    guide_trace : pyro.poutine.Trace
        The guide trace of the current particle (to read upstream sample values).
    """

    site: str
    data_dim: int | None
    indices: torch.Tensor | None
    args: tuple
    guide_trace: Any


def _align(values: torch.Tensor, data_dim: int | None) -> torch.Tensor:
    """Place a per-datapoint tensor (last dim = data) at ``data_dim`` of the signal."""
    if data_dim is None or values.dim() == 0:
        return values
    return values.reshape(values.shape + (1,) * (-data_dim - 1))


def _per_datapoint_mean(signal: torch.Tensor, data_dim: int) -> torch.Tensor:
    """Average a signal over every dim but the data plate's: shape ``(B,)``."""
    signal = signal.reshape((1,) * max(0, -data_dim - signal.dim()) + signal.shape)
    dim = signal.dim() + data_dim
    other = [d for d in range(signal.dim()) if d != dim]
    return signal.mean(dim=other) if other else signal


class Baseline(nn.Module):
    """Base class: an additive baseline :math:`b` for one site's learning signal.

    Subclasses implement :meth:`predict` and, if they learn online, :meth:`update`
    (running statistics) or :meth:`loss` (a differentiable fitting loss).
    """

    def predict(self, ctx: BaselineContext, like: torch.Tensor) -> torch.Tensor:
        """The baseline, broadcastable to the signal ``like`` (may carry gradients)."""
        raise NotImplementedError

    def update(self, ctx: BaselineContext, target: torch.Tensor) -> None:
        """Record the (detached) residual signal this baseline should predict."""

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor | float:
        """A loss whose gradient fits learnable baselines (zero for fixed ones)."""
        return 0.0


class ConstantBaseline(Baseline):
    """A fixed number :math:`b = c` (mainly to check that baselines leave the mean intact).

    Parameters
    ----------
    value : float
        The constant.
    """

    def __init__(self, value: float):
        super().__init__()
        self.value = float(value)

    def predict(self, ctx: BaselineContext, like: torch.Tensor) -> torch.Tensor:
        return like.new_tensor(self.value)

    def extra_repr(self) -> str:
        return f"value={self.value}"


class RunningAverageBaseline(Baseline):
    r"""Exponential moving average of the learning signal, per datapoint or global.

    With ``per_datapoint=True`` (default) the average is kept for every dataset row
    :math:`i`, keyed by the data plate's subsample indices
    (``pyro.plate("data", N, subsample=idx)``), so any batch size works and the batch
    composition may change between steps:

    .. math::

        b_i \leftarrow \beta\, b_i + (1 - \beta)\, \bar\ell_i ,

    where :math:`\bar\ell_i` is the signal of row :math:`i` averaged over particles. A row
    not seen yet uses the global average, and its average starts from there (shrinkage:
    after a few visits it is a blend of the global and the row's own history).
    With ``per_datapoint=False`` only the global average is kept (NVIL's :math:`c`).

    Data parallel (:mod:`pyro_lvm.collective`): every rank predicts for its own
    rows, then all ranks apply the *union* batch's update (the rows and indices of every
    shard are gathered, the global mean is the union mean), so the averages stay
    identical on every rank and equal to a single process's on the union batch; the
    prediction for a batch never depends on that batch's signal, so the gradient stays
    unbiased.

    Parameters
    ----------
    num_data : int, optional
        Number of dataset rows. If omitted, storage grows with the largest index seen.
    beta : float
        Decay in :math:`[0, 1)`.
    per_datapoint : bool
        Keep one average per row (needs the data plate's indices) or a single one.
    """

    def __init__(self, num_data: int | None = None, beta: float = 0.9, per_datapoint: bool = True):
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"RunningAverageBaseline beta must be in [0, 1), got {beta}")
        if num_data is not None and num_data <= 0:
            raise ValueError(f"RunningAverageBaseline num_data must be positive, got {num_data}")
        self.num_data, self.beta, self.per_datapoint = num_data, beta, per_datapoint
        size = num_data if (num_data is not None and per_datapoint) else 0
        self.register_buffer("average", torch.zeros(size))
        self.register_buffer("seen", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("global_average", torch.zeros(()))
        self.register_buffer("global_seen", torch.zeros((), dtype=torch.bool))

    def _indices(self, ctx: BaselineContext) -> torch.Tensor:
        if ctx.data_dim is None or ctx.indices is None:
            raise ValueError(
                f"RunningAverageBaseline at site {ctx.site!r} needs the site inside a data "
                "plate with row indices (pyro.plate('data', N, subsample=idx)); or pass "
                "per_datapoint=False"
            )
        idx = ctx.indices.long()
        top = int(idx.max()) + 1 if idx.numel() else 0
        if top > self.average.shape[0]:
            if self.num_data is not None:
                raise ValueError(
                    f"data index {top - 1} is out of range for RunningAverageBaseline("
                    f"num_data={self.num_data}); pass the dataset size as num_data"
                )
            self._resize(top)
        return idx

    def _resize(self, size: int) -> None:
        pad = size - self.average.shape[0]
        self.average = torch.cat([self.average, self.average.new_zeros(pad)])
        self.seen = torch.cat([self.seen, self.seen.new_zeros(pad)])

    def predict(self, ctx: BaselineContext, like: torch.Tensor) -> torch.Tensor:
        fallback = self.global_average * self.global_seen
        if not self.per_datapoint:
            return fallback.to(like)
        idx = self._indices(ctx)
        values = torch.where(self.seen[idx], self.average[idx], fallback)
        return _align(values.to(like), ctx.data_dim)

    @torch.no_grad()
    def update(self, ctx: BaselineContext, target: torch.Tensor) -> None:
        if not self.training:
            return
        beta = self.beta
        fallback = self.global_average * self.global_seen  # before this batch
        # data parallel: the union batch's mean and rows (every rank applies them all)
        batch_mean = global_mean(target).to(self.global_average)
        self.global_average.copy_(
            torch.where(
                self.global_seen, beta * self.global_average + (1 - beta) * batch_mean, batch_mean
            )
        )
        self.global_seen.fill_(True)
        if not self.per_datapoint:
            return
        idx = self._indices(ctx)
        rows = _per_datapoint_mean(target, ctx.data_dim).to(self.average)
        if current_collective() is not None:
            idx, rows = all_gather_cat(idx), all_gather_cat(rows)
            if idx.numel() and int(idx.max()) >= self.average.shape[0]:
                self._resize(int(idx.max()) + 1)
        # a new row starts from the global average (shrinkage): one noisy visit would
        # make a worse baseline than the global average
        old = torch.where(self.seen[idx], self.average[idx], fallback)
        self.average[idx] = beta * old + (1 - beta) * rows
        self.seen[idx] = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # storage grows with the data seen: adopt the checkpoint's size before copying
        saved = state_dict.get(prefix + "average")
        if saved is not None and saved.shape != self.average.shape:
            self.average = self.average.new_zeros(saved.shape)
            self.seen = self.seen.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_data={self.num_data}, beta={self.beta}, per_datapoint={self.per_datapoint}"


class NeuralBaseline(Baseline):
    r"""Input-dependent baseline :math:`b = C_\psi(x)` (NVIL), fitted by least squares.

    The network is trained by adding :math:`\sum_i (\ell_i - b_{<} - C_\psi(x_i))^2` to
    the surrogate loss (its value is not added to the reported loss), where
    :math:`b_{<}` are the baselines listed before it. Optimise its parameters together
    with the model's (they are returned by the estimator's ``parameters()``).

    Parameters
    ----------
    module : nn.Module
        Maps the input to one number per datapoint: output ``(..., B)`` or ``(..., B, 1)``.
    input_site : str, optional
        Feed the value of this guide site (it must be upstream of the baselined site)
        instead of the data batch (the model's first argument).
    """

    def __init__(self, module: nn.Module, input_site: str | None = None):
        super().__init__()
        self.module, self.input_site = module, input_site

    def predict(self, ctx: BaselineContext, like: torch.Tensor) -> torch.Tensor:
        if self.input_site is None:
            if not ctx.args or not torch.is_tensor(ctx.args[0]):
                raise ValueError(
                    f"NeuralBaseline at site {ctx.site!r} reads the data batch from the "
                    "model's first argument, which is not a tensor; pass input_site="
                )
            inputs = ctx.args[0]
        else:
            if self.input_site not in ctx.guide_trace.nodes:
                raise ValueError(
                    f"NeuralBaseline input_site {self.input_site!r} is not a guide site"
                )
            inputs = ctx.guide_trace.nodes[self.input_site]["value"]
        out = self.module(detach_provenance(inputs).detach())
        if out.dim() >= 2 and out.shape[-1] == 1:
            out = out.squeeze(-1)
        return _align(out.to(like.dtype), ctx.data_dim)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (target - prediction).pow(2).sum()


class SignalNormalization(nn.Module):
    r"""NVIL's variance normalisation: divide the centred signal by
    :math:`\max(1, \sqrt{v})`, with :math:`v` a running variance of the centred signal.

    .. math::

        m \leftarrow \beta m + (1-\beta)\,\overline{\ell'}, \qquad
        v \leftarrow \beta v + (1-\beta)\,\overline{(\ell' - m)^2} .

    The estimate becomes unbiased for the gradient scaled by the current (known)
    factor: it rescales each site's score-function term, which is what keeps the step
    size stable while the signal's scale changes during training. It does not centre
    the signal: pair it with a :class:`RunningAverageBaseline` and/or
    :class:`NeuralBaseline` listed before it.

    Parameters
    ----------
    beta : float
        Decay of the running moments (NVIL uses 0.8).
    """

    def __init__(self, beta: float = 0.8):
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"SignalNormalization beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def scale(self) -> torch.Tensor:
        """The divisor :math:`\\max(1, \\sqrt v)` used for the next batch."""
        return self.var.clamp(min=1.0).sqrt()

    @torch.no_grad()
    def update(self, centred: torch.Tensor) -> None:
        if not self.training:
            return
        centred = centred.to(self.mean)
        m = global_mean(centred)  # data parallel: moments of the union batch
        v = global_mean((centred - m).pow(2))
        b = torch.where(self.initialized, torch.tensor(self.beta).to(m), torch.zeros_like(m))
        self.mean.copy_(b * self.mean + (1 - b) * m)
        self.var.copy_(b * self.var + (1 - b) * v)
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
