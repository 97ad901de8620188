r"""Observation models as distribution objects.

A decoder maps a latent ``z`` to an unconstrained tensor of the data's shape
(``(..., D)``, data flattened); a :class:`Likelihood` module turns that tensor into a
:class:`pyro.distributions.Distribution` with one event dimension, so that a Pyro model
reads ``pyro.sample("x", likelihood(decoder(z)), obs=x)``. No loss-name strings: every
evaluator consumes ``log_prob`` of these objects.

Each likelihood also knows the data it accepts (:meth:`Likelihood.check_data`), so bad
input fails with one line naming the problem and the fix instead of a silent NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro import distributions as dist
from torch import nn
from torch.distributions import constraints

from pyro_lvm.data.formats import BINARY, EIGHT_BIT_SYMMETRIC, REAL, DataFormat, check_finite

__all__ = [
    "Likelihood",
    "BernoulliLikelihood",
    "GaussianLikelihood",
    "DiscretizedLogistic",
    "DiscretizedLogisticLikelihood",
    "make_likelihood",
    "LIKELIHOODS",
    "check_finite",
]


class Likelihood(nn.Module):
    """Base class: ``forward(params) -> Distribution`` with event shape ``(D,)``.

    ``params`` has the data's trailing dimension ``D`` and any batch dimensions.
    """

    #: name used by the CLI and in ``config.json``
    name: str = "likelihood"
    #: the data range this likelihood expects, used for plotting and checks
    data_range: tuple[float, float] = (0.0, 1.0)
    #: what the data layer maps intensities to for this likelihood
    data_format: DataFormat = REAL

    def check_data(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` (one line) if ``x`` is not valid data for this likelihood."""
        check_finite(x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Mean of the observation distribution (used for reconstructions and samples)."""
        return self(params).mean


class BernoulliLikelihood(Likelihood):
    r"""Factorised Bernoulli likelihood, :math:`p(x \mid z) = \prod_d \mathrm{Bern}(x_d;
    \sigma(\ell_d))`, from decoder logits :math:`\ell`.

    Observations must lie in :math:`[0, 1]`. Values strictly inside the interval are
    accepted (the usual "continuous cross-entropy"), but then ``log_prob`` is not a
    normalised density; binarize for likelihood numbers.
    """

    name = "bernoulli"
    data_format = BINARY

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(
                f"Bernoulli likelihood needs data in [0, 1], got values in "
                f"[{float(x.min()):.3g}, {float(x.max()):.3g}]; rescale the data or use "
                "--likelihood gaussian"
            )

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)


class GaussianLikelihood(Likelihood):
    r"""Factorised Gaussian likelihood :math:`\mathcal N(x; \mu(z), \sigma^2 I)`.

    Parameters
    ----------
    scale : float
        Initial (or fixed) observation standard deviation :math:`\sigma`.
    learn_scale : bool
        Learn :math:`\log\sigma` as a parameter.
    per_dim : int, optional
        If given with ``learn_scale``, learn one scale per data dimension (``per_dim``
        entries) instead of one global scale.
    """

    name = "gaussian"
    data_range = (float("-inf"), float("inf"))

    def __init__(self, scale: float = 1.0, learn_scale: bool = True, per_dim: int | None = None):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"Gaussian likelihood scale must be positive, got {scale}")
        log_scale = torch.full((per_dim or 1,), math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        scale = self.log_scale.exp().expand(loc.shape)
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params


def _log_diff_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) - exp(b))`` for ``a > b``."""
    # log(-expm1(d)) stays finite (and so do its gradients) even where torch.where later
    # discards this branch; log1p(-exp(d)) would round to log(0) in float32 for |d| < 6e-8
    return a + torch.log(-torch.expm1((b - a).clamp(max=-1e-30)))


class DiscretizedLogistic(dist.TorchDistribution):
    r"""Discretized logistic distribution over ``num_bins`` equally spaced values in
    :math:`[-1, 1]` (Salimans et al. 2017; the likelihood of the LAE paper).

    For a bin centre :math:`x` with half-width :math:`h = 1/(\text{num\_bins}-1)`,

    .. math::

        p(x) = \sigma\!\left(\frac{x + h - \mu}{s}\right)
             - \sigma\!\left(\frac{x - h - \mu}{s}\right),

    with the lowest bin extending to :math:`-\infty` and the highest to :math:`+\infty`,
    so the probabilities sum to one. Computed in log space for stability.

    References
    ----------
    Salimans, Karpathy, Chen, Kingma (2017), "PixelCNN++", ICLR.
    Taniguchi et al. (2022), "Langevin Autoencoders for Learning Deep Latent Variable
    Models", NeurIPS.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.interval(-1.0, 1.0)
    has_rsample = False

    def __init__(self, loc, scale, num_bins: int = 256, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, torch.as_tensor(scale).to(loc))
        self.num_bins = num_bins
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return DiscretizedLogistic(
            self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.num_bins
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        half = 1.0 / (self.num_bins - 1)
        inv_s = 1.0 / self.scale
        centred = value - self.loc
        plus = (centred + half) * inv_s
        minus = (centred - half) * inv_s
        log_cdf_plus = F.logsigmoid(plus)  # log sigma(plus): the lowest bin
        log_sf_minus = -F.softplus(minus)  # log(1 - sigma(minus)): the highest bin
        # sigma(plus) - sigma(minus) in log space, from the CDF side left of the mode and
        # from the survival side right of it, so neither side cancels catastrophically.
        left = _log_diff_exp(log_cdf_plus, F.logsigmoid(minus))
        right = _log_diff_exp(log_sf_minus, -F.softplus(plus))
        log_delta = torch.where(centred < 0, left, right)
        lower = value < -1 + half / 2
        upper = value > 1 - half / 2
        return torch.where(lower, log_cdf_plus, torch.where(upper, log_sf_minus, log_delta))

    def sample(self, sample_shape=torch.Size()):  # noqa: B008 (torch convention)
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
            x = self.loc.expand(shape) + self.scale.expand(shape) * (u.log() - (-u).log1p())
            return self.quantize(x, self.num_bins)

    @staticmethod
    def quantize(x: torch.Tensor, num_bins: int = 256) -> torch.Tensor:
        """Round values to the nearest of ``num_bins`` bin centres in ``[-1, 1]``."""
        k = torch.round((x.clamp(-1, 1) + 1) * (num_bins - 1) / 2)
        return k * 2 / (num_bins - 1) - 1

    @property
    def mean(self):
        return self.loc.clamp(-1, 1)


class DiscretizedLogisticLikelihood(Likelihood):
    r"""Discretized logistic likelihood with one learned global scale (LAE paper).

    Data must be 8-bit values mapped to :math:`[-1, 1]` (see
    :func:`pyro_lvm.data.to_8bit_symmetric`).
    """

    name = "logistic"
    data_range = (-1.0, 1.0)
    data_format = EIGHT_BIT_SYMMETRIC

    def __init__(self, num_bins: int = 256, init_scale: float = 0.1):
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.num_bins = num_bins
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        scale = self.log_scale.exp()
        return DiscretizedLogistic(loc, scale.expand(loc.shape), self.num_bins).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        if x.numel() == 0:
            return
        if x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6:
            raise ValueError(
                f"discretized logistic likelihood needs data in [-1, 1], got "
                f"[{float(x.min()):.3g}, {float(x.max()):.3g}]; map 8-bit images with "
                "pyro_lvm.data.to_8bit_symmetric"
            )
        off_grid = (DiscretizedLogistic.quantize(x, self.num_bins) - x).abs().max()
        if off_grid > 1e-4:
            raise ValueError(
                f"discretized logistic likelihood needs data on a {self.num_bins}-level "
                "grid in [-1, 1]; quantize with pyro_lvm.data.to_8bit_symmetric"
            )

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.clamp(-1, 1)


#: likelihood classes by CLI name
LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls
    for cls in (BernoulliLikelihood, GaussianLikelihood, DiscretizedLogisticLikelihood)
}


def make_likelihood(name: str, data_dim: int | None = None, **kwargs) -> Likelihood:
    """Build a likelihood by CLI name: ``bernoulli``, ``gaussian`` or ``logistic``."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name](**kwargs)
