"""Model files as users write them for ``pyro-lvm train custom --model-file``: sources
the tests write to disk."""

import textwrap

# the docs/custom_models.md pattern: trained values in Pyro's param store, one constrained
PARAM_MODEL = textwrap.dedent(
    """
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.distributions import constraints
    from torch import nn


    class PriorParams(nn.Module):
        def __init__(self, data_dim, latent_dim):
            super().__init__()
            self.latent_dim = latent_dim
            self.dec = nn.Linear(latent_dim, data_dim)
            self.enc = nn.Linear(data_dim, 2 * latent_dim)

        def model(self, x):
            loc = pyro.param("prior_loc", torch.zeros(self.latent_dim))
            scale = pyro.param(
                "prior_scale", torch.ones(self.latent_dim), constraint=constraints.positive
            )
            with pyro.plate("data", x.shape[0]):
                prior = dist.Normal(loc, scale).expand([x.shape[0], self.latent_dim])
                z = pyro.sample("z", prior.to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

        def guide(self, x):
            loc, log_scale = self.enc(x).chunk(2, -1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


    def build(config, data_dim, likelihood):
        return PriorParams(data_dim, config.latent_dim)
    """
)
