r"""What running pyro_lvm on the ports needs beyond the ports themselves.

Not ports: :class:`DMMEncoder` and :class:`DictEncoder` give ALD an encoder
:math:`x \mapsto z` where the authors wrote none (the DMM's guide samples :math:`z_t`
from :math:`z_{t-1}`; the sparse gamma DEF's guide is per-datapoint ``pyro.param``);
they share the wrapped modules' parameters (nothing is copied). :class:`UnmaskLatents`
makes NUTS a usable reference on ragged DMM batches. Pyro's VAE example needs nothing:
the kernel takes its ``(loc, scale)`` encoder as written.
"""

from __future__ import annotations

import pyro
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.messenger import Messenger
from torch import nn

from .dmm import DMM


class DMMEncoder(nn.Module):
    r"""Every latent ``z_1 .. z_T`` of the DMM from one final ``nn.Linear``.

    The trunk is the guide's own: the RNN over the reversed sequences (``dmm.rnn``,
    ``dmm.h_0``) and the combiner's hidden state with :math:`z_{t-1}` replaced by
    ``dmm.z_q_0`` (so that the output is affine in the head),
    :math:`h_t = \tfrac12(\tanh(W z_{q,0} + b) + h^{\rm rnn}_t)`. The features of a
    sequence are :math:`(h_1, \dots, h_T)` concatenated (width ``T * rnn_dim``), and one
    head ``nn.Linear(T * rnn_dim, T * z_dim)`` outputs the sites as column slices. The
    head starts block-diagonal with the combiner's ``lin_hidden_to_loc`` in every block,
    so the first output is the combiner's ``loc`` at :math:`z_{t-1} = z_{q,0}`.

    Its input is :func:`dmm_encoder_input` of the model's arguments.
    """

    def __init__(self, dmm: DMM, T_max: int):
        super().__init__()
        self.dmm, self.T_max = dmm, T_max
        combiner = dmm.combiner
        rnn_dim, z_dim = (
            combiner.lin_hidden_to_loc.in_features,
            combiner.lin_hidden_to_loc.out_features,
        )
        self.z_dim = z_dim
        self.head = nn.Linear(T_max * rnn_dim, T_max * z_dim)
        with torch.no_grad():
            self.head.weight.copy_(torch.block_diag(*[combiner.lin_hidden_to_loc.weight] * T_max))
            self.head.bias.copy_(combiner.lin_hidden_to_loc.bias.repeat(T_max))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, T * rnn_dim)`` trunk features of the input of :func:`dmm_encoder_input`."""
        dmm = self.dmm
        reversed_padded, mask = x[..., :-1], x[..., -1]
        lengths = mask.sum(1).round().long().cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            reversed_padded, lengths, batch_first=True, enforce_sorted=False
        )
        h_0 = dmm.h_0.expand(1, x.shape[0], dmm.rnn.hidden_size).contiguous()
        rnn_output, _ = dmm.rnn(packed, h_0)
        rnn_output, _ = nn.utils.rnn.pad_packed_sequence(
            rnn_output, batch_first=True, total_length=self.T_max
        )
        # pad_and_reverse undoes the time reversal per sequence
        rnn_output = pad_and_reverse_padded(rnn_output, lengths)
        z_prev = dmm.z_q_0.expand(x.shape[0], -1)
        h_z = dmm.combiner.tanh(dmm.combiner.lin_z_to_hidden(z_prev))
        h_combined = 0.5 * (h_z[:, None, :] + rnn_output)
        return h_combined.reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.head(self.features(x))
        d = self.z_dim
        return {f"z_{t + 1}": y[:, t * d : (t + 1) * d] for t in range(self.T_max)}


def pad_and_reverse_padded(rnn_output: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The second half of the example's ``pad_and_reverse`` (on an already padded output):
    each sequence's first ``length`` steps reversed in time, padding left at zero."""
    out = torch.zeros_like(rnn_output)
    for b in range(rnn_output.shape[0]):
        T = int(lengths[b])
        out[b, :T] = rnn_output[b, :T].flip(0)
    return out


def dmm_encoder_input(
    mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths, annealing_factor=1.0
) -> torch.Tensor:
    """``encoder_input=`` for :class:`DMMEncoder`: the reversed, padded sequences with the
    mask as an extra last channel, ``(n, T, input_dim + 1)`` (the kernel needs one tensor
    whose first dimension is the data plate)."""
    reversed_padded, _ = nn.utils.rnn.pad_packed_sequence(
        mini_batch_reversed, batch_first=True, total_length=mini_batch.shape[1]
    )
    return torch.cat([reversed_padded, mini_batch_mask[..., None].to(reversed_padded)], -1)


class DictEncoder(nn.Module):
    """``trunk`` then one ``nn.Linear`` head whose output columns are split into sites:
    ``{name: y[:, a:b]}`` in the order of ``sizes``."""

    def __init__(self, trunk: nn.Module, width: int, sizes: dict[str, int]):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(width, sum(sizes.values()))
        self.sizes = dict(sizes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.head(self.trunk(x))
        out, a = {}, 0
        for name, size in self.sizes.items():
            out[name] = y[:, a : a + size]
            a += size
        return out


class UnmaskLatents(Messenger):
    """Give masked latent sites their unmasked prior: ``Independent(Masked(base))`` ->
    ``Independent(base)``. For a NUTS reference on ragged DMM batches: a masked latent
    has a flat (improper) potential, along which NUTS trajectories never turn (every
    draw at the maximal tree depth); with its proper prior back, and nothing else
    depending on it, the posterior of the unmasked coordinates is unchanged."""

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if msg["is_observed"] or not isinstance(fn, pyro.distributions.Independent):
            return
        if isinstance(fn.base_dist, MaskedDistribution):
            msg["fn"] = fn.base_dist.base_dist.to_event(fn.reinterpreted_batch_ndims)


__all__ = ["DMMEncoder", "DictEncoder", "UnmaskLatents", "dmm_encoder_input"]
