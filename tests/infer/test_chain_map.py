"""chain_map's trunk-only path: an ``nn.Sequential`` encoder ending in the chain's head
runs its trunk alone once a batch shape is checked, with the same numbers as the capture
hook; anything that could make ``encoder(x)`` differ from ``head(trunk(x))`` keeps the
hook."""

import copy

import pyro
import pyro.distributions as dist
import torch
from ald_driver import Chain
from torch import nn

from pyro_lvm.infer import AmortizedLangevin
from pyro_lvm.infer.mcmc import chain as chain_module
from pyro_lvm.infer.mcmc.chain import sequential_trunk

DECODER = nn.Linear(2, 3)
torch.nn.init.constant_(DECODER.weight, 0.5)
torch.nn.init.constant_(DECODER.bias, -0.25)


def model(x):
    decoder = DECODER
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)


def _encoder() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2))


def _counting(monkeypatch) -> list[int]:
    calls = [0]
    original = chain_module.run_capturing

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(chain_module, "run_capturing", counted)
    return calls


def _states(kernel, x, batches: int = 3) -> list[tuple]:
    out = []
    for _ in range(batches):
        chain = Chain(kernel, x)
        start = chain.langevin
        torch.manual_seed(1)
        chain.step()
        out.append((start.potential, start.grad, chain.position))
        chain.write_back()
    return out


def test_a_sequential_encoder_runs_its_trunk_alone_with_the_hooks_numbers(monkeypatch):
    x = torch.randn(20, 3)
    fast_encoder, hooked_encoder = _encoder(), _encoder()
    hooked_encoder[-1].register_forward_hook(lambda module, inputs, output: None)
    calls = _counting(monkeypatch)
    fast = _states(AmortizedLangevin(model, fast_encoder, step_size=0.05), x)
    # finding the head, then the first batch checks the layout; the others skip the hook
    assert calls[0] == 2
    hooked = _states(AmortizedLangevin(model, hooked_encoder, step_size=0.05), x)
    assert calls[0] == 2 + 1 + 3  # a hook on the head: the encoder runs whole every batch
    for a, b in zip(fast, hooked):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    assert torch.equal(fast_encoder[-1].weight, hooked_encoder[-1].weight)


def test_a_new_batch_shape_is_checked_again(monkeypatch):
    kernel = AmortizedLangevin(model, _encoder(), step_size=0.05)
    calls = _counting(monkeypatch)
    for rows in (20, 20, 7, 7, 20):
        kernel.bind(torch.randn(rows, 3))
    assert calls[0] == 1 + 2  # finding the head, then once per batch shape


def test_encoders_that_may_differ_from_head_of_trunk_keep_the_hook():
    class Doubled(nn.Sequential):
        def forward(self, x):
            return super().forward(2 * x)

    torch.manual_seed(0)
    doubled = Doubled(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2))
    assert sequential_trunk(doubled, doubled[-1]) is None
    plain = _encoder()
    assert sequential_trunk(plain, plain[-1]) is not None
    hooked = copy.deepcopy(plain)
    hooked.register_forward_pre_hook(lambda module, inputs: None)
    assert sequential_trunk(hooked, hooked[-1]) is None
    shared = nn.Linear(3, 3)
    assert sequential_trunk(nn.Sequential(shared, nn.Tanh(), shared), shared) is None
    # the doubled encoder's features are its trunk's at 2x, batch after batch
    kernel = AmortizedLangevin(model, doubled, step_size=0.05)
    x = torch.randn(20, 3)
    for _ in range(2):
        (features,) = kernel.bind(x).chain.features
        assert torch.equal(features, doubled[1](doubled[0](2 * x)))
