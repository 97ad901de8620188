r"""A deterministic autoencoder made generative by a Gaussian-mixture prior on its codes.

Training (:class:`pyro_lvm.infer.AutoencoderFit`) minimises the reconstruction loss of a
deterministic MLP encoder :math:`e_\phi` and decoder, read as a likelihood,

.. math::

    \mathcal L(\theta, \phi) = -\sum_i \log p_\theta\big(x_i \mid z = e_\phi(x_i)\big),

with any :class:`~pyro_lvm.models.likelihoods.Likelihood` (Bernoulli: binary
cross-entropy; Gaussian: squared error plus a learned noise scale). Afterwards
(:meth:`AEGMM.finalize`) a ``K``-component full-covariance Gaussian mixture is fitted by EM
to the training codes :math:`e_\phi(x_i)` and becomes the prior of the generative model

.. math::

    z \sim \sum_k \pi_k \mathcal N(\mu_k, \Sigma_k), \qquad
    x \mid z \sim p_\theta(x \mid z).

Before that fit the prior is :math:`\mathcal N(0, I)`, as in every pyro_lvm model.

**Evaluation.** The shared importance-weighted evaluator needs a proposal; the
autoencoder has none, so :meth:`AEGMM.guide` is
:math:`q(z \mid x) = \mathcal N(e_\phi(x), \mathrm{diag}\, s^2)` with one scale per latent
dimension. The IWAE estimate is a stochastic lower bound of :math:`\log p(x)` for *any*
proposal and converges to it as the number of samples grows, but a badly scaled proposal
makes it loose at a finite ``K`` (too narrow misses posterior mass; too wide wastes
samples). So :meth:`AEGMM.fit_proposal_scale` chooses :math:`s` by maximising the ELBO of
this proposal on training data (the best member of the family by the bound it is judged
with); test data are never used.

References
----------
Ghosh, Sajjadi, Vergari, Black, Schölkopf (2020), "From variational to deterministic
autoencoders", ICLR (ex-post density estimation with a GMM on the codes).
Burda, Grosse, Salakhutdinov (2016), "Importance Weighted Autoencoders", ICLR.
"""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

from pyro_lvm.models.base import LatentVariableModel
from pyro_lvm.models.gmm import (
    GaussianMixtureParams,
    fit_gaussian_mixture,
    gaussian_mixture,
)
from pyro_lvm.models.likelihoods import BernoulliLikelihood, Likelihood
from pyro_lvm.models.nets import MLP

__all__ = ["AEGMM"]


class AEGMM(LatentVariableModel):
    """Deterministic MLP autoencoder with a post-hoc Gaussian-mixture prior.

    Parameters
    ----------
    data_dim, latent_dim : int
        Data and latent dimensions.
    num_components : int
        Mixture components ``K`` of the prior.
    likelihood : Likelihood, optional
        Observation model and reconstruction loss (default Bernoulli).
    proposal_scale : float
        Scale :math:`s` of the evaluation proposal until :meth:`fit_proposal_scale` runs.
    **net
        Network options of encoder and decoder (``hidden_dim``, ``depth``,
        ``layer_norm``, ``orthogonal_init``, ``activation``;
        :data:`~pyro_lvm.models.base.NETWORK_DEFAULTS`).

    Notes
    -----
    The mixture (``mixture_logits``, ``mixture_loc``, ``mixture_scale_tril``,
    ``prior_fitted``) and the proposal scale (``proposal_log_scale``) are buffers, so
    ``state_dict`` checkpoints carry the fitted prior.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        num_components: int = 10,
        likelihood: Likelihood | None = None,
        proposal_scale: float = 0.1,
        **net: Any,
    ):
        if num_components <= 0:
            raise ValueError(
                f"num_components must be a positive integer, got {num_components}; pass e.g. "
                "--num-components 10"
            )
        if not proposal_scale > 0:
            raise ValueError(f"proposal_scale must be positive, got {proposal_scale}")
        super().__init__(data_dim, latent_dim, None, likelihood, **net)
        self.encoder = MLP(data_dim, latent_dim, **self.net)
        self.num_components = num_components
        k, z = num_components, latent_dim
        self.register_buffer("mixture_logits", torch.full((k,), -math.log(k)))
        self.register_buffer("mixture_loc", torch.zeros(k, z))
        self.register_buffer("mixture_scale_tril", torch.eye(z).expand(k, z, z).clone())
        self.register_buffer("prior_fitted", torch.tensor(False))
        self.register_buffer("proposal_log_scale", torch.full((z,), math.log(proposal_scale)))

    # -- prior ------------------------------------------------------------------------
    @property
    def mixture_params(self) -> GaussianMixtureParams:
        return GaussianMixtureParams(
            self.mixture_logits, self.mixture_loc, self.mixture_scale_tril
        )

    def set_prior(self, params: GaussianMixtureParams) -> None:
        """Use the mixture ``params`` (``K = num_components``) as the prior from now on."""
        shapes = (
            (self.num_components,),
            (self.num_components, self.latent_dim),
            (self.num_components, self.latent_dim, self.latent_dim),
        )
        for name, value, shape in zip(params._fields, params, shapes):
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"mixture {name} must have shape {shape}, got {tuple(value.shape)}"
                )
        with torch.no_grad():
            self.mixture_logits.copy_(params.logits - params.logits.logsumexp(0))
            self.mixture_loc.copy_(params.loc)
            self.mixture_scale_tril.copy_(params.scale_tril)
            self.prior_fitted.fill_(True)

    def prior(self, batch_size: int) -> dist.Distribution:
        r"""The mixture over ``(batch_size, latent_dim)`` once fitted, else
        :math:`\mathcal N(0, I)`."""
        if not bool(self.prior_fitted):
            return super().prior(batch_size)
        return gaussian_mixture(self.mixture_params).expand([batch_size])

    # -- autoencoder ----------------------------------------------------------------------
    def reconstruction_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p_\theta(x_i \mid z = e_\phi(x_i))` per datapoint, shape ``(B,)``."""
        return self.decode(self.encoder(x)).log_prob(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code :math:`e_\\phi(x)`."""
        return self.encoder(x)

    # -- evaluation proposal ----------------------------------------------------------
    def posterior(
        self, x: torch.Tensor, log_scale: torch.Tensor | None = None
    ) -> dist.Distribution:
        r"""The proposal :math:`\mathcal N(e_\phi(x), \mathrm{diag}\, s^2)` (one event dim)."""
        log_scale = self.proposal_log_scale if log_scale is None else log_scale
        loc = self.encoder(x)
        return dist.Normal(loc, log_scale.exp().expand(loc.shape)).to_event(1)

    def guide(self, x: torch.Tensor, log_scale: torch.Tensor | None = None) -> None:
        """Pyro guide: the evaluation proposal (the autoencoder itself has no guide)."""
        self.register()
        with pyro.plate("data", x.shape[0]):
            pyro.sample(self.latent_site, self.posterior(x, log_scale))

    # -- post-training fits -----------------------------------------------------------
    @torch.no_grad()
    def codes(self, x: torch.Tensor, chunk_size: int = 1000) -> torch.Tensor:
        """Codes of ``x`` computed in chunks (bounded memory on large training sets)."""
        return torch.cat([self.encoder(c) for c in x.split(chunk_size)])

    def fit_prior(self, x: torch.Tensor, **em_options) -> dict[str, float]:
        """Fit the mixture prior to the codes of ``x`` by EM (see
        :func:`~pyro_lvm.models.gmm.fit_gaussian_mixture`); returns diagnostics."""
        params, info = fit_gaussian_mixture(self.codes(x), self.num_components, **em_options)
        self.set_prior(params)
        return {
            "gmm_code_log_lik": info.mean_log_likelihood,
            "gmm_converged": float(info.converged),
            "gmm_iters": float(info.num_iters),
        }

    def fit_proposal_scale(
        self,
        x: torch.Tensor,
        num_steps: int = 100,
        num_particles: int = 4,
        lr: float = 0.05,
    ) -> dict[str, float]:
        r"""Set the proposal scales :math:`s` to maximise the ELBO of :meth:`guide` on ``x``.

        Starts from a tenth of the codes' spread per dimension and takes ``num_steps``
        Adam steps on :math:`\log s` only (reparameterised ``num_particles``-sample ELBO);
        the networks and the prior are left untouched.
        """
        if num_steps < 0 or num_particles < 1:
            raise ValueError(
                f"need num_steps >= 0 and num_particles >= 1, got {num_steps}, {num_particles}"
            )
        codes = self.codes(x)
        spread = codes.std(0) if codes.shape[0] > 1 else torch.ones_like(codes[0])
        log_scale = (0.1 * spread.clamp_min(1e-6)).log().requires_grad_(True)
        optim = torch.optim.Adam([log_scale], lr=lr)
        elbo = Trace_ELBO(
            num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
        )
        loss = torch.tensor(float("nan"))

        def model(x, log_scale):
            self.model(x)

        for _ in range(num_steps):
            loss = elbo.differentiable_loss(model, self.guide, x, log_scale)
            # gradient for log_scale only: the networks' .grad stay untouched
            (grad,) = torch.autograd.grad(loss, [log_scale])
            log_scale.grad = grad
            optim.step()
        with torch.no_grad():
            self.proposal_log_scale.copy_(log_scale)
        return {
            "proposal_scale": log_scale.exp().mean().item(),
            "proposal_train_nelbo": loss.item() / x.shape[0],
        }

    def finalize(
        self, train_x: torch.Tensor, num_proposal_points: int = 128, **em_options
    ) -> dict[str, float]:
        """Fit the prior to all training codes, then the proposal scale on a random subset.

        Grey-level data for a Bernoulli likelihood are binarized once first, as the
        encoder saw them in training. Randomness (binarization, EM start, subset, ELBO
        noise) is drawn from a fork of torch's global generator: the fit is deterministic
        given the generator's state and leaves that state untouched, so a checkpoint
        written after ``finalize`` resumes training exactly as if it never ran.
        """
        self.check_data(train_x)
        devices = [train_x.device] if train_x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            x = train_x
            if isinstance(self.likelihood, BernoulliLikelihood) and ((x > 0) & (x < 1)).any():
                x = torch.bernoulli(x)
            out = self.fit_prior(x, **em_options)
            subset = torch.randperm(x.shape[0], device=x.device)[:num_proposal_points]
            out.update(self.fit_proposal_scale(x[subset]))
        return out
