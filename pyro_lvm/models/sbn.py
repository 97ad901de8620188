r"""Sigmoid belief networks and the Bernoulli-latent VAE.

A sigmoid belief net (Neal 1992) with :math:`L` layers of binary latents,

.. math::

    z_L \sim \mathrm{Bern}(\sigma(a)), \quad
    z_{l} \mid z_{l+1} \sim \mathrm{Bern}(\sigma(f_l(z_{l+1}))), \quad
    x \mid z_1 \sim p_\theta(x \mid z_1),

with a mirrored guide :math:`q(z_1 \mid x)\prod_{l>1} q(z_l \mid z_{l-1})`. The standard
benchmark architectures (NVIL, VIMCO, REBAR, RELAX, ARM, DisARM papers) use 200 latents
per layer and either *linear* maps (``784 -> 200`` logits) or *nonlinear* maps with two
deterministic hidden layers of 200 units and LeakyReLU(0.3) (``784-200-200-200``,
mirrored in the decoder); the prior logits :math:`a` are learned.

Latent sites are ``"z1"`` (next to the data) to ``"zL"``; every layer is a
``Bernoulli(...).to_event(1)`` site inside the data plate ``"data"`` (dim -1), so the
estimators :class:`~pyro_lvm.infer.TraceNVIL_ELBO` and :class:`~pyro_lvm.infer.VIMCO`
and the shared evaluator :func:`~pyro_lvm.infer.iwae_log_likelihood` apply unchanged.

``model(x, idx)`` and ``guide(x, idx)`` take optional dataset row indices ``idx``: the
data plate is ``pyro.plate("data", size, subsample=idx)``, which exposes the rows to
per-datapoint baselines. ``size`` is ``num_data`` if set (minibatch log-densities scaled
by :math:`N/B`, an unbiased estimate of the full-data ELBO) and otherwise the batch size
(no scaling: losses are batch sums).

References
----------
Neal (1992), "Connectionist learning of belief networks", Artificial Intelligence.
Mnih, Gregor (2014), "Neural Variational Inference and Learning in Belief Networks", ICML.
Dong, Mnih, Tucker (2020), "DisARM: An Antithetic Gradient Estimator for Binary Latent
Variables", NeurIPS.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_lvm.models.base import LatentVariableModel, check_num
from pyro_lvm.models.likelihoods import BernoulliLikelihood, Likelihood

__all__ = ["SigmoidBeliefNet", "BernoulliVAE", "make_bernoulli_net"]


def make_bernoulli_net(
    in_dim: int, out_dim: int, hidden_dim: int = 200, depth: int = 0, activation: str = "leaky"
) -> nn.Sequential:
    """``depth`` hidden layers (LeakyReLU(0.3) or ReLU) then a ``Linear`` to logits."""
    acts = {"leaky": lambda: nn.LeakyReLU(0.3), "relu": nn.ReLU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(acts)}")
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden_dim), acts[activation]()]
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def _bernoulli(logits: torch.Tensor) -> dist.Distribution:
    return dist.Bernoulli(logits=logits).to_event(1)


class SigmoidBeliefNet(LatentVariableModel):
    """Sigmoid belief net with 1 to 3 layers of binary latents and a mirrored guide.

    Parameters
    ----------
    data_dim : int
        Dimension of a (flattened) datapoint.
    latent_dim : int
        Binary units per stochastic layer (200 in the benchmarks).
    num_layers : int
        Stochastic layers, 1 to 3.
    nonlinear : bool
        Two deterministic hidden layers (LeakyReLU(0.3)) in every map, else linear maps.
    hidden_dim : int
        Width of the deterministic hidden layers (nonlinear variant).
    likelihood : Likelihood, optional
        Observation model (default Bernoulli; then observations must be 0/1).
    learn_prior : bool
        Learn the top layer's prior logits (else a uniform Bernoulli(0.5) prior).
    num_data : int, optional
        Dataset size: with ``idx``, log-densities are scaled by ``num_data / B``.
    depth, activation
        Override the hidden layers of every map (``depth=2, activation="leaky"`` is the
        nonlinear variant).
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 200,
        num_layers: int = 1,
        nonlinear: bool = False,
        hidden_dim: int = 200,
        likelihood: Likelihood | None = None,
        learn_prior: bool = True,
        num_data: int | None = None,
        depth: int | None = None,
        activation: str = "leaky",
    ):
        if not 1 <= num_layers <= 3:
            raise ValueError(f"num_layers must be 1, 2 or 3, got {num_layers}")
        if latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        depth = (2 if nonlinear else 0) if depth is None else depth
        net = dict(hidden_dim=hidden_dim, depth=depth, activation=activation)
        decoder = make_bernoulli_net(latent_dim, data_dim, **net)
        super().__init__(data_dim, latent_dim, decoder, likelihood or BernoulliLikelihood())
        self.num_layers, self.num_data = num_layers, num_data
        self.latent_sites = self._site_names(num_layers)
        self.latent_site = self.latent_sites[0]
        # encoders[0]: x -> z1, encoders[l]: z_l -> z_{l+1}; decoders[l-1]: z_{l+1} -> z_l
        self.encoders = nn.ModuleList(
            [make_bernoulli_net(data_dim, latent_dim, **net)]
            + [make_bernoulli_net(latent_dim, latent_dim, **net) for _ in range(num_layers - 1)]
        )
        self.decoders = nn.ModuleList(
            [make_bernoulli_net(latent_dim, latent_dim, **net) for _ in range(num_layers - 1)]
        )
        prior = torch.zeros(latent_dim)
        if learn_prior:
            self.prior_logits = nn.Parameter(prior)
        else:
            self.register_buffer("prior_logits", prior)

    @staticmethod
    def _site_names(num_layers: int) -> tuple[str, ...]:
        return tuple(f"z{l}" for l in range(1, num_layers + 1))

    # -- checks ------------------------------------------------------------------------
    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        if isinstance(self.likelihood, BernoulliLikelihood) and ((x != 0) & (x != 1)).any():
            raise ValueError(
                f"{type(self).__name__} with a Bernoulli likelihood needs binary (0/1) "
                "observations; binarize the data (pyro_lvm.data.binarize)"
            )

    def _plate(self, x: torch.Tensor, idx: torch.Tensor | None):
        if idx is not None and len(idx) != x.shape[0]:
            raise ValueError(
                f"idx has {len(idx)} indices for a batch of {x.shape[0]} rows; pass one "
                "dataset index per row"
            )
        size = self.num_data if (idx is not None and self.num_data) else x.shape[0]
        return pyro.plate("data", size, subsample=idx, dim=-1)

    # -- Pyro model and guide ----------------------------------------------------------
    def prior(self, batch_size: int) -> dist.Distribution:
        """Top-layer prior :math:`\\mathrm{Bern}(\\sigma(a))` over ``(batch_size, latent_dim)``."""
        return _bernoulli(self.prior_logits.expand(batch_size, self.latent_dim))

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """:math:`p(z_L) \\prod_l p(z_l \\mid z_{l+1})\\, p(x \\mid z_1)` over a batch."""
        self.register()
        if isinstance(self.likelihood, BernoulliLikelihood):
            self.check_data(x)
        sites = self.latent_sites
        with self._plate(x, idx):
            z = pyro.sample(sites[-1], self.prior(x.shape[0]))
            for l in reversed(range(self.num_layers - 1)):
                z = pyro.sample(sites[l], _bernoulli(self.decoders[l](z)))
            pyro.sample(self.data_site, self.decode(z), obs=x)

    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """:math:`q(z_1 \\mid x) \\prod_{l>1} q(z_l \\mid z_{l-1})`."""
        self.register()
        h = x
        with self._plate(x, idx):
            for site, encoder in zip(self.latent_sites, self.encoders):
                h = pyro.sample(site, _bernoulli(encoder(h)))

    # -- conveniences ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior probabilities :math:`q(z_1 = 1 \\mid x)` of the first layer."""
        return torch.sigmoid(self.encoders[0](x))

    @torch.no_grad()
    def generate(self, num: int) -> torch.Tensor:
        """Means of :math:`p(x \\mid z_1)` for ancestral samples of the latents."""
        z = self.prior(check_num(num)).sample()
        for l in reversed(range(self.num_layers - 1)):
            z = _bernoulli(self.decoders[l](z)).sample()
        return self.likelihood.mean(self.decoder(z))


class BernoulliVAE(SigmoidBeliefNet):
    """The Bernoulli-latent VAE of seed 001: one layer of 20 binary latents with a uniform
    prior, one hidden layer of 400 ReLU units in encoder and decoder; latent site ``"z"``.

    Parameters
    ----------
    data_dim : int
        Dimension of a datapoint.
    latent_dim, hidden_dim : int
        Binary latents (20) and hidden width (400).
    likelihood : Likelihood, optional
        Observation model (default Bernoulli).
    learn_prior : bool
        Learn the prior logits (default: fixed uniform prior).
    num_data : int, optional
        See :class:`SigmoidBeliefNet`.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 20,
        hidden_dim: int = 400,
        likelihood: Likelihood | None = None,
        learn_prior: bool = False,
        num_data: int | None = None,
    ):
        super().__init__(
            data_dim,
            latent_dim,
            num_layers=1,
            hidden_dim=hidden_dim,
            likelihood=likelihood,
            learn_prior=learn_prior,
            num_data=num_data,
            depth=1,
            activation="relu",
        )

    @staticmethod
    def _site_names(num_layers: int) -> tuple[str, ...]:
        return ("z",)
