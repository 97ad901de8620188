r"""The shape every pyro_lvm model shares.

A :class:`LatentVariableModel` is an :class:`torch.nn.Module` with an ordinary Pyro
``model(x)``: a data plate over the rows of ``x`` (shape ``(B, D)``), a latent site
``"z"`` with a standard normal prior and an observed site ``"x"`` drawn from a
:class:`~pyro_lvm.models.likelihoods.Likelihood` of the decoder output,

.. math::

    z_i \sim \mathcal N(0, I), \qquad x_i \mid z_i \sim p_\theta(x_i \mid z_i).

Parameters live on the module (``model.parameters()``): plain :mod:`torch.optim`
optimizers, ``state_dict`` checkpoints and
:func:`pyro.infer.Trace_ELBO.differentiable_loss` all work. ``model`` and ``guide`` also
register the module with :func:`pyro.module` (:meth:`LatentVariableModel.register`), so
Pyro's own :class:`pyro.infer.SVI` with a :mod:`pyro.optim` optimizer trains it too. The
module's tensors *are* the param store entries (no copies), so both routes update the same
parameters and a ``state_dict`` is always current. The model supports extra batch
dimensions to the left of the data plate (vectorized particles).
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.params import param_with_module_name
from torch import nn

from pyro_lvm._registration import all_held
from pyro_lvm.models.likelihoods import BernoulliLikelihood, Likelihood
from pyro_lvm.models.nets import MLP

__all__ = ["LatentVariableModel", "NETWORK_DEFAULTS"]

#: the MLP options of the ready models (decoder and encoder alike)
NETWORK_DEFAULTS = {
    "hidden_dim": 256,
    "depth": 2,
    "layer_norm": False,
    "orthogonal_init": False,
    "activation": "relu",
}


class LatentVariableModel(nn.Module):
    """Base class: prior, decoder and likelihood; subclasses add a :meth:`posterior`
    (which :meth:`guide` samples) or their own ``guide``.

    Parameters
    ----------
    data_dim : int
        Dimension ``D`` of a (flattened) datapoint.
    latent_dim : int
        Dimension of ``z``.
    decoder : nn.Module, optional
        Maps ``(..., latent_dim)`` to likelihood parameters ``(..., data_dim)``; default
        an :class:`~pyro_lvm.models.nets.MLP` with the network options.
    likelihood : Likelihood, optional
        Observation model (default Bernoulli).
    **net
        The network options every ready model shares (``hidden_dim``, ``depth``,
        ``layer_norm``, ``orthogonal_init``, ``activation``; :data:`NETWORK_DEFAULTS`),
        kept as ``self.net`` for the subclass's encoder.
    """

    latent_site = "z"
    data_site = "x"
    #: number of plates in ``model`` (the data plate); particle plates go left of it
    max_plate_nesting = 1
    #: prefix of this model's names in Pyro's param store (``name$$$decoder.0.weight``);
    #: ``None``: the class name
    pyro_name: str | None = None

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        decoder: nn.Module | None = None,
        likelihood: Likelihood | None = None,
        **net: Any,
    ):
        super().__init__()
        if latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        if data_dim <= 0:
            raise ValueError(f"data_dim must be a positive integer, got {data_dim}")
        unknown = sorted(set(net) - set(NETWORK_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown network options {unknown}; use {sorted(NETWORK_DEFAULTS)}")
        self.data_dim, self.latent_dim = data_dim, latent_dim
        #: the network options, for the subclass's encoder
        self.net = {**NETWORK_DEFAULTS, **net}
        self.decoder = decoder if decoder is not None else MLP(latent_dim, data_dim, **self.net)
        self.likelihood = likelihood if likelihood is not None else BernoulliLikelihood()

    # -- Pyro's param store -------------------------------------------------------------
    def register(self) -> None:
        """Register this module's trainable parameters as Pyro params, as
        :func:`pyro.module` does (``name$$$decoder.0.weight``).

        Called at the start of :meth:`model` and :meth:`guide`, so :class:`pyro.infer.SVI`
        finds every parameter in its trace. Pyro's rule is that an existing param store
        entry wins over the module's tensor; here the module's own tensor always wins
        (entries of the same name that belong to another instance, e.g. an earlier model
        of the same class, are replaced), because the module's ``state_dict`` is the
        checkpoint and a stale entry would be trained in place of the real parameter.
        """
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if all_held(p for _, p in trainable):
            return  # a pyro_lvm driver already trains all of them (pyro_lvm._registration)
        name = self.pyro_name or type(self).__name__
        store = pyro.get_param_store()
        # pyro.module(name, self) without its warning for frozen (requires_grad=False)
        # parameters, which are simply not Pyro params
        for param_name, p in trainable:
            full = param_with_module_name(name, param_name)
            if store.param_name(p) != full and full in store:
                del store[full]
            pyro.param(full, p)

    # -- generative side ------------------------------------------------------------
    def prior(self, batch_size: int) -> dist.Distribution:
        """:math:`\\mathcal N(0, I)` over ``(batch_size, latent_dim)`` with one event dim."""
        # expanded 0-d tensors: no (batch, latent) allocation per call
        p = next(self.parameters(), None)
        kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
        loc, scale = torch.zeros((), **kw), torch.ones((), **kw)
        shape = (batch_size, self.latent_dim)
        return dist.Normal(loc, scale).expand(shape).to_event(1)

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """The observation distribution :math:`p_\\theta(x \\mid z)`."""
        return self.likelihood(self.decoder(z))

    def model(self, x: torch.Tensor) -> None:
        """Pyro model :math:`p(z)\\,p_\\theta(x \\mid z)` over a batch ``x`` of shape (B, D)."""
        self.register()
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(self.latent_site, self.prior(x.shape[0]))
            pyro.sample(self.data_site, self.decode(z), obs=x)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        r""":math:`q(z \mid x)` with one event dim (the guide's distribution)."""
        raise NotImplementedError(f"{type(self).__name__} has no variational guide")

    def guide(self, x: torch.Tensor) -> None:
        """Pyro guide: ``z`` from :meth:`posterior` inside the data plate."""
        self.register()
        with pyro.plate("data", x.shape[0]):
            pyro.sample(self.latent_site, self.posterior(x))

    # -- conveniences used by evaluation and figures -----------------------------------
    def check_data(self, x: torch.Tensor) -> None:
        """One-line ``ValueError`` for data this model cannot take."""
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(
                f"expected data of shape (batch, {self.data_dim}), got {tuple(x.shape)}; "
                "flatten each datapoint to a vector"
            )
        if x.shape[0] == 0:
            raise ValueError("got an empty batch of data; pass at least one datapoint")
        self.likelihood.check_data(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """A point summary of :math:`q(z \\mid x)` (the posterior mean where known)."""
        raise NotImplementedError(f"{type(self).__name__} has no encoder")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of :math:`p(x \\mid z)` at ``z = encode(x)``."""
        return self.likelihood.mean(self.decoder(self.encode(x)))

    @torch.no_grad()
    def generate(self, num: int) -> torch.Tensor:
        """Means of :math:`p(x \\mid z)` for ``num`` draws ``z`` from the prior."""
        z = self.prior(num).sample()
        return self.likelihood.mean(self.decoder(z))
