"""CompiledFunction and the jit_compile paths of ModuleSVI and AmortizedLangevin: the
compiled computation equals the eager one (values, gradients, random draws), per input
signature, with Pyro params visible to enclosing handlers."""

import copy
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from ald_driver import Chain
from pyro import poutine
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyro_lvm.infer import LAE, AmortizedLangevin, ModuleSVI
from pyro_lvm.infer import sites as ap
from pyro_lvm.infer.compile import CompiledFunction, CompileWarning
from pyro_lvm.models import VAE, LangevinAutoencoder


class _Model(nn.Module):
    """A user's model: a module decoder, a pyro.param scale, the plate size read from
    the data (the value Pyro's own JIT bakes in)."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(2, 3)

    def model(self, x):
        scale = pyro.param("obs_scale", torch.tensor(0.7), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), scale).to_event(1), obs=x)


def _log_joint(m, z, x):
    spec = ap.inspect_model(m.model, (x,), {}, local_sites=["z"])[0]
    return ap.log_joint(m.model, spec, {"z": z}, (x,), {})


def test_value_and_gradients_match_eager_per_batch_shape():
    pyro.clear_param_store()
    torch.manual_seed(0)
    m = _Model()
    compiled = CompiledFunction(lambda z, x: _log_joint(m, z, x))
    for n in (5, 5, 3, 5):  # a short batch gets its own graph, then the full one is reused
        x, z = torch.randn(n, 3), torch.randn(n, 2, requires_grad=True)
        eager = _log_joint(m, z, x)
        got = compiled(z, x)
        assert torch.allclose(got, eager, atol=1e-5)
        params = [z, *m.parameters(), pyro.param("obs_scale").unconstrained()]
        g_eager = torch.autograd.grad(eager, params)
        g_got = torch.autograd.grad(got, params)
        for a, b in zip(g_got, g_eager):
            assert torch.allclose(a, b, atol=1e-5)
    assert compiled.num_compiled == 2


def test_pyro_params_are_seen_by_enclosing_handlers_and_updates_are_read():
    pyro.clear_param_store()
    m = _Model()
    x, z = torch.randn(4, 3), torch.randn(4, 2)
    compiled = CompiledFunction(lambda z, x: _log_joint(m, z, x))
    compiled(z, x)
    with poutine.trace(param_only=True) as tr:
        before = compiled(z, x)
    assert "obs_scale" in tr.trace.nodes
    with torch.no_grad():  # an optimizer's in-place update reaches the compiled graph
        pyro.param("obs_scale").unconstrained().add_(0.5)
        m.decoder.weight.mul_(2.0)
    assert torch.allclose(compiled(z, x), _log_joint(m, z, x), atol=1e-5)
    assert not torch.allclose(compiled(z, x), before)


def test_random_draws_match_eager_and_compiling_consumes_no_random_numbers():
    def noisy(loc):
        return (loc + torch.randn(3)).square().sum()

    loc = torch.zeros(3)
    compiled = CompiledFunction(noisy)
    torch.manual_seed(1)
    first = compiled(loc)  # compiles, then replays: one draw, as an eager call
    second = compiled(loc)
    torch.manual_seed(1)
    assert torch.allclose(first, noisy(loc)) and torch.allclose(second, noisy(loc))


def test_untraceable_function_falls_back_to_eager_with_a_warning():
    compiled = CompiledFunction(lambda x: {"a": x.sum()}, name="f")
    with pytest.warns(CompileWarning, match="f runs eagerly.*not a Tensor"):
        out = compiled(torch.ones(2))
    assert out["a"] == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per signature, not per call
        compiled(torch.ones(2))


def _svi_pair(loss_eager, loss_jit, **jit_kwargs):
    pyro.clear_param_store()
    torch.manual_seed(0)
    a = VAE(6, 2, hidden_dim=8)
    b = copy.deepcopy(a)
    b.pyro_name = "VAE_jit"
    sa = ModuleSVI(a.model, a.guide, torch.optim.Adam(a.parameters(), lr=1e-2), loss=loss_eager)
    sb = ModuleSVI(
        b.model, b.guide, torch.optim.Adam(b.parameters(), lr=1e-2), loss=loss_jit, **jit_kwargs
    )
    return a, b, sa, sb


@pytest.mark.parametrize(
    "loss_eager, loss_jit, kwargs",
    [
        (Trace_ELBO(), Trace_ELBO(), {"jit_compile": True}),
        (Trace_ELBO(), JitTrace_ELBO(), {}),
        (TraceMeanField_ELBO(), JitTraceMeanField_ELBO(), {}),
    ],
    ids=["jit_compile", "JitTrace_ELBO", "JitTraceMeanField_ELBO"],
)
def test_module_svi_compiled_takes_the_eager_steps(loss_eager, loss_jit, kwargs):
    a, b, sa, sb = _svi_pair(loss_eager, loss_jit, **kwargs)
    data = torch.bernoulli(torch.full((23, 6), 0.4))
    for epoch in range(2):
        for batch in data.split(10):  # 10, 10, 3: the short last batch compiles apart
            torch.manual_seed(epoch)
            la = sa.step(batch)
            torch.manual_seed(epoch)
            lb = sb.step(batch)
            assert la == pytest.approx(lb, rel=1e-4, abs=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-4)
    assert sb._compiled.num_compiled == 2  # compiled once per shape, never per call


def test_lae_compiled_takes_the_eager_steps():
    torch.manual_seed(0)
    a = LangevinAutoencoder(6, 2, hidden_dim=16)
    b = copy.deepcopy(a)
    la = LAE(a.model, a.encoder, torch.optim.Adam(a.parameters(), lr=1e-2), step_size=1e-3)
    lb = LAE(
        b.model,
        b.encoder,
        torch.optim.Adam(b.parameters(), lr=1e-2),
        step_size=1e-3,
        jit_compile=True,
    )
    data = torch.bernoulli(torch.full((14, 6), 0.4))
    for step in range(4):
        batch = data[:10] if step % 2 == 0 else data[10:]
        torch.manual_seed(step)
        va = la.step(batch)
        torch.manual_seed(step)
        vb = lb.step(batch)
        assert va == pytest.approx(vb, rel=1e-4, abs=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-4)
    assert la.metrics()["accept_rate"] == pytest.approx(lb.metrics()["accept_rate"], abs=1e-6)


def test_amortized_langevin_compiled_with_positive_and_global_sites():
    """A user's model with a constrained local site and a global site: the compiled
    potential equals the eager one, with its Jacobian terms."""

    def model(x):
        tau = pyro.sample("tau", dist.Gamma(2.0, 2.0))
        with pyro.plate("data", x.shape[0]):
            lam = pyro.sample("lam", dist.Gamma(2.0, 1.0).expand([x.shape[0], 3]).to_event(1))
            pyro.sample("x", dist.Normal(lam.log(), tau.rsqrt()).to_event(1), obs=x)

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 3))
    x = torch.randn(8, 3)
    kernels = [
        AmortizedLangevin(model, copy.deepcopy(encoder), latent_site="lam", jit_compile=jit)
        for jit in (False, True)
    ]
    values = []
    for kernel in kernels:
        torch.manual_seed(1)  # the same prior draw of the global site
        state = Chain(kernel, x).langevin
        values.append((state.potential, state.grad, kernel.potential(x)))
    for a, b in zip(*values):
        assert torch.allclose(a, b, atol=1e-5)
    assert kernels[1]._potential_of.num_compiled == 1  # one signature, with or without grad


def test_module_svi_score_function_guide_runs_eagerly_with_a_warning():
    """A guide site without rsample: the surrogate is not the loss, so no compile."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5).expand([x.shape[0]]))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.4), constraint=dist.constraints.unit_interval)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(p).expand([x.shape[0]]))

    pyro.clear_param_store()
    svi = ModuleSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), jit_compile=True)
    with pytest.warns(CompileWarning, match=r"guide sites \['z'\] are not reparameterized"):
        loss = svi.step(torch.randn(5))
    assert loss == loss and svi._compiled is None


def test_module_svi_refuses_jit_compile_for_other_elbos():
    from pyro.infer import TraceGraph_ELBO

    with pytest.raises(ValueError, match="jit_compile supports Trace_ELBO"):
        ModuleSVI(
            lambda: None,
            lambda: None,
            torch.optim.Adam([torch.zeros(1)]),
            loss=TraceGraph_ELBO(),
            jit_compile=True,
        )
