"""Drive the pure ALD core on one bound batch, as :class:`pyro_lvm.infer.LAE` does, for
tests that look at single transitions (no optimizer step)."""

from __future__ import annotations

import torch

from pyro_lvm.infer.mcmc import ald


class Chain:
    """A kernel's chain on the batch ``args``: ``step()`` is one transition."""

    def __init__(self, kernel, *args, adapt: bool = False, **kwargs):
        self.kernel, self.adapt = kernel, adapt
        self.batch = kernel.bind(*args, **kwargs)
        self.langevin = ald.ald_init(self.batch, kernel.state, reduce_fn=kernel.reduce_fn)
        kernel.start(self.batch, self.langevin)
        self.accepted = self.n = 0

    def step(self):
        k = self.kernel
        self.langevin, info = ald.ald_transition(
            self.langevin,
            self.batch,
            k.state.step_size,
            mh=k.mh,
            generator=k.generator,
            reduce_fn=k.reduce_fn,
        )
        k.state = k.state._replace(t=k.state.t + 1)
        if self.adapt:
            k.state = ald.ald_adapt(
                k.state, info.accept_prob, k.target_accept_prob, adapt_window=k.adapt_window
            )
        self.accepted += float(info.accepted)
        self.n += 1
        return info

    @property
    def position(self) -> torch.Tensor:
        return self.langevin.position

    def latents(self, position: torch.Tensor | None = None, site: str | None = None):
        """The (unconstrained) value of ``site`` (default: the one local site)."""
        position = self.langevin.position if position is None else position
        with torch.no_grad():
            values = self.batch.chain.local_values(position[: self.batch.chain_size])
        return values[site or self.kernel.latent_sites[0]]

    def accept_rate(self) -> float:
        return self.accepted / self.n

    def write_back(self) -> None:
        held = ald.write_back(self.langevin, self.batch, self.kernel.chain_params)
        if held is not None:
            self.kernel.state = self.kernel.state._replace(globals=held)
