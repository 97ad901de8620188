# ruff: noqa: UP031  (the example's own "%" string formatting, kept as written)
"""Port of Pyro's ``examples/sparse_gamma_def.py`` (sparse gamma deep exponential family).

Source: https://github.com/pyro-ppl/pyro/blob/dev/examples/sparse_gamma_def.py,
Copyright (c) 2017-2019 Uber Technologies, Inc., SPDX-License-Identifier: Apache-2.0.
Model: Ranganath, Tang, Charlin, Blei (2015), "Deep exponential families".

``SparseGammaDEF.model`` and its mean-field Gamma ``guide`` (with ``clip_params``) are
the example's, comments included: global Gamma weights ``w_top``, ``w_mid``,
``w_bottom`` and three layers of local Gamma latents ``z_top -> z_mid -> z_bottom``
inside the data plate, a Poisson likelihood. Adapted for offline use: the layer widths
and the image size (100, 40, 15 and 64 x 64 in the example) are constructor arguments
with the example's values as defaults, and the Olivetti faces become
:func:`synthetic_counts`; the ``AutoDiagonalNormal`` and ``EasyGuide`` alternatives, the
global ``set_rng_seed`` / default-dtype calls at import and ``main`` are left out.
"""

from __future__ import annotations

import pyro
import torch
from pyro.distributions import Gamma, Poisson
from torch.nn.functional import softplus


# helper for initializing variational parameters
def rand_tensor(shape, mean, sigma):
    return mean * torch.ones(shape) + sigma * torch.randn(shape)


class SparseGammaDEF:
    def __init__(self, top_width=100, mid_width=40, bottom_width=15, image_size=64 * 64):
        # define the sizes of the layers in the deep exponential family
        self.top_width = top_width
        self.mid_width = mid_width
        self.bottom_width = bottom_width
        self.image_size = image_size
        # define hyperparameters that control the prior
        self.alpha_z = torch.tensor(0.1)
        self.beta_z = torch.tensor(0.1)
        self.alpha_w = torch.tensor(0.1)
        self.beta_w = torch.tensor(0.3)
        # define parameters used to initialize variational parameters
        self.alpha_init = 0.5
        self.mean_init = 0.0
        self.sigma_init = 0.1

    # define the model
    def model(self, x):
        x_size = x.size(0)

        # sample the global weights
        with pyro.plate("w_top_plate", self.top_width * self.mid_width):
            w_top = pyro.sample("w_top", Gamma(self.alpha_w, self.beta_w))
        with pyro.plate("w_mid_plate", self.mid_width * self.bottom_width):
            w_mid = pyro.sample("w_mid", Gamma(self.alpha_w, self.beta_w))
        with pyro.plate("w_bottom_plate", self.bottom_width * self.image_size):
            w_bottom = pyro.sample("w_bottom", Gamma(self.alpha_w, self.beta_w))

        # sample the local latent random variables
        # (the plate encodes the fact that the z's for different datapoints are
        # conditionally independent)
        with pyro.plate("data", x_size):
            z_top = pyro.sample(
                "z_top",
                Gamma(self.alpha_z, self.beta_z).expand([self.top_width]).to_event(1),
            )
            # note that we need to use matmul (batch matrix multiplication) as well as
            # appropriate reshaping to make sure our code is fully vectorized
            w_top = (
                w_top.reshape(self.top_width, self.mid_width)
                if w_top.dim() == 1
                else w_top.reshape(-1, self.top_width, self.mid_width)
            )
            mean_mid = torch.matmul(z_top, w_top)
            z_mid = pyro.sample("z_mid", Gamma(self.alpha_z, self.beta_z / mean_mid).to_event(1))

            w_mid = (
                w_mid.reshape(self.mid_width, self.bottom_width)
                if w_mid.dim() == 1
                else w_mid.reshape(-1, self.mid_width, self.bottom_width)
            )
            mean_bottom = torch.matmul(z_mid, w_mid)
            z_bottom = pyro.sample(
                "z_bottom", Gamma(self.alpha_z, self.beta_z / mean_bottom).to_event(1)
            )

            w_bottom = (
                w_bottom.reshape(self.bottom_width, self.image_size)
                if w_bottom.dim() == 1
                else w_bottom.reshape(-1, self.bottom_width, self.image_size)
            )
            mean_obs = torch.matmul(z_bottom, w_bottom)

            # observe the data using a poisson likelihood
            pyro.sample("obs", Poisson(mean_obs).to_event(1), obs=x)

    # define our custom guide a.k.a. variational distribution.
    # (note the guide is mean field gamma)
    def guide(self, x):
        x_size = x.size(0)

        # define a helper function to sample z's for a single layer
        def sample_zs(name, width):
            alpha_z_q = pyro.param(
                "alpha_z_q_%s" % name,
                lambda: rand_tensor((x_size, width), self.alpha_init, self.sigma_init),
            )
            mean_z_q = pyro.param(
                "mean_z_q_%s" % name,
                lambda: rand_tensor((x_size, width), self.mean_init, self.sigma_init),
            )
            alpha_z_q, mean_z_q = softplus(alpha_z_q), softplus(mean_z_q)
            pyro.sample("z_%s" % name, Gamma(alpha_z_q, alpha_z_q / mean_z_q).to_event(1))

        # define a helper function to sample w's for a single layer
        def sample_ws(name, width):
            alpha_w_q = pyro.param(
                "alpha_w_q_%s" % name,
                lambda: rand_tensor((width), self.alpha_init, self.sigma_init),
            )
            mean_w_q = pyro.param(
                "mean_w_q_%s" % name,
                lambda: rand_tensor((width), self.mean_init, self.sigma_init),
            )
            alpha_w_q, mean_w_q = softplus(alpha_w_q), softplus(mean_w_q)
            pyro.sample("w_%s" % name, Gamma(alpha_w_q, alpha_w_q / mean_w_q))

        # sample the global weights
        with pyro.plate("w_top_plate", self.top_width * self.mid_width):
            sample_ws("top", self.top_width * self.mid_width)
        with pyro.plate("w_mid_plate", self.mid_width * self.bottom_width):
            sample_ws("mid", self.mid_width * self.bottom_width)
        with pyro.plate("w_bottom_plate", self.bottom_width * self.image_size):
            sample_ws("bottom", self.bottom_width * self.image_size)

        # sample the local latent random variables
        with pyro.plate("data", x_size):
            sample_zs("top", self.top_width)
            sample_zs("mid", self.mid_width)
            sample_zs("bottom", self.bottom_width)


# define a helper function to clip parameters defining the custom guide.
# (this is to avoid regions of the gamma distributions with extremely small means)
def clip_params():
    for param, clip in zip(("alpha", "mean"), (-2.5, -4.5)):
        for layer in ["_q_top", "_q_mid", "_q_bottom"]:
            for wz in ["_w", "_z"]:
                pyro.param(param + wz + layer).data.clamp_(min=clip)


def synthetic_counts(num_images: int = 20, image_size: int = 16, *, seed: int = 0) -> torch.Tensor:
    """Count images ``(num_images, image_size)`` in place of the Olivetti faces: each
    image is a Poisson draw around a nonnegative mix of three sparse "parts" (blocks of
    bright pixels) with Gamma(2, 1) weights, so the data have the low-rank nonnegative
    structure the model looks for; counts are mostly 0-15."""
    gen = torch.Generator().manual_seed(seed)
    parts = torch.zeros(3, image_size)
    for k in range(3):
        start = k * image_size // 3
        parts[k, start : start + max(1, image_size // 3)] = 4.0
    # Gamma(2, 1) as a sum of two Exponential(1) draws (torch has no seeded gamma sampler)
    weights = -torch.rand(2, num_images, 3, generator=gen).log().sum(0)
    rate = weights @ parts + 0.3
    return torch.poisson(rate, generator=gen).to(torch.get_default_dtype())
