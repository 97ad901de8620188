"""The compiled path (jit_compile=) against eager mode, on models as users write them.

Ten models whose Python side a compiled graph could bake in (a branch on the data, an
annealed KL weight, a scale read with float(), dropout then eval(), Python's random, a
buffer updated in place, a mutated NumPy argument, an enclosing poutine.scale, and the
branch again under LAE and under Pyro's JitTrace_ELBO): compiled and eager runs take the
same steps, and where the compiled path cannot replay the model it says why in one
CompileWarning and runs eagerly. Never a silent difference.

Most tests use the "fx" backend (the captured graphs replayed without Inductor: the
guards and the capture are the same, compiling takes no time); the tests marked
``inductor`` check the compiled kernels themselves.
"""

from __future__ import annotations

import copy
import random
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from ald_driver import Chain
from pyro import poutine
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyro_lvm.infer import LAE, AmortizedLangevin, ModuleSVI
from pyro_lvm.infer import sites as ap
from pyro_lvm.infer.compile import MAX_CAPTURES, MAX_ENTRIES, CompiledFunction, CompileWarning
from pyro_lvm.models import VAE, LangevinAutoencoder

D, Z, H = 6, 2, 8


def _data(n: int = 10, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, D), 0.4), generator=gen)


class UserVAE(nn.Module):
    """A VAE as a researcher writes one: pyro.module, a plate, a Gaussian guide."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 2 * Z))
        self.decoder = nn.Sequential(nn.Linear(Z, H), nn.Tanh(), nn.Linear(H, D))

    def logits(self, z, x):
        return self.decoder(z)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], Z]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.logits(z, x)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, log_scale = self.encoder(x).split(Z, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


class BranchVAE(UserVAE):
    """1. A data-dependent branch: a sharper decoder for dense batches."""

    def logits(self, z, x):
        logits = self.decoder(z)
        if x.mean() > 0.4:
            logits = 2.0 * logits
        return logits


class AnnealedVAE(UserVAE):
    """2. KL annealing: the latent site's log-density scaled by ``self.beta``."""

    beta = 0.1

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.beta):
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], Z]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, log_scale = self.encoder(x).split(Z, -1)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=self.beta):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


class NoiseScaleModel(UserVAE):
    """3. A Gaussian likelihood whose scale is read from the batch with ``float()``."""

    def model(self, x):
        pyro.module("decoder", self.decoder)
        sigma = float(x.std()) + 0.1
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], Z]).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), sigma).to_event(1), obs=x)


class DropoutVAE(UserVAE):
    """4. Dropout in the decoder: random in training, off after ``.eval()``."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(Z, H), nn.Tanh(), nn.Dropout(0.3), nn.Linear(H, D))


class AugmentedVAE(UserVAE):
    """5. Augmentation with Python's ``random``: a random flip of the features."""

    def model(self, x):
        if random.random() < 0.5:
            x = x.flip(-1)
        super().model(x)

    def guide(self, x):
        super().guide(x)


class TemperedVAE(UserVAE):
    """6. A likelihood temperature held in a buffer that the training loop updates in
    place (``model.temperature.fill_(t)``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("temperature", torch.tensor(1.0))

    def logits(self, z, x):
        return self.decoder(z) / self.temperature


class RunningMeanVAE(UserVAE):
    """6'. A buffer the model updates itself, in place (a running mean of the data)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(D))

    def logits(self, z, x):
        self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.decoder(z) + self.mean


class WeightedVAE(UserVAE):
    """7. Per-feature likelihood weights passed as a NumPy array (``model(x, w)``)."""

    def model(self, x, weights):
        pyro.module("decoder", self.decoder)
        w = torch.as_tensor(weights, dtype=x.dtype)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], Z]).to_event(1))
            logits = self.decoder(z)
            pyro.factor("x", (w * dist.Bernoulli(logits=logits).log_prob(x)).sum(-1))

    def guide(self, x, weights):
        super().guide(x)


def _svi_pair(make, loss=Trace_ELBO, jit_loss=None, **jit):
    """An eager and a compiled ModuleSVI on copies of one user model."""
    torch.manual_seed(0)
    eager_model = make()
    compiled_model = copy.deepcopy(eager_model)
    eager = ModuleSVI(
        eager_model.model,
        eager_model.guide,
        torch.optim.Adam(eager_model.parameters(), lr=0.05),
        loss=loss(),
    )
    compiled = ModuleSVI(
        compiled_model.model,
        compiled_model.guide,
        torch.optim.Adam(compiled_model.parameters(), lr=0.05),
        loss=(jit_loss or loss)(),
        **(jit or {"jit_compile": "fx"}),
    )
    return eager_model, compiled_model, eager, compiled


def _steps(pair, batches, before_step=None, wrap=None):
    """Both runs' losses, step by step, with the same random numbers; the compiled run's
    warnings."""
    eager_model, compiled_model, eager, compiled = pair
    losses = {"eager": [], "compiled": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileWarning)
        for step, args in enumerate(batches):
            for name, svi, model in (
                ("eager", eager, eager_model),
                ("compiled", compiled, compiled_model),
            ):
                if before_step is not None:
                    before_step(model, step)
                torch.manual_seed(step)
                random.seed(step)
                with wrap() if wrap is not None else _nothing():
                    losses[name].append(svi.step(*args))
    messages = [str(w.message) for w in caught if issubclass(w.category, CompileWarning)]
    return losses, messages


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_same(losses):
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-4)


def _batches(n=4):
    x = _data(14)
    return [(x[:10],) if i % 2 == 0 else (x[10:],) for i in range(n)]


# -- the ten models -----------------------------------------------------------------------


def test_1_data_dependent_branch_runs_eagerly_and_says_why():
    losses, messages = _steps(_svi_pair(BranchVAE), _batches())
    _assert_same(losses)
    assert len(messages) == 1 and "reads a tensor's value into Python (bool()" in messages[0]
    assert "test_compile.py" in messages[0]  # the user's line is named


def test_2_annealed_kl_weight_recompiles_then_runs_eagerly():
    pair = _svi_pair(AnnealedVAE)

    def anneal(model, step):
        model.beta = min(1.0, 0.1 + 0.2 * step)

    losses, messages = _steps(pair, _batches(6), before_step=anneal)
    _assert_same(losses)
    assert len(messages) == 1 and "AnnealedVAE.beta changed between calls" in messages[0]
    # a weight that changes once (warm-up over) compiles again, without a warning
    pair = _svi_pair(AnnealedVAE)
    losses, messages = _steps(pair, _batches(6), before_step=lambda m, s: anneal(m, min(s, 1)))
    _assert_same(losses)
    assert not messages and pair[3]._compiled.eager_reason is None


def test_3_noise_scale_read_with_float_runs_eagerly():
    losses, messages = _steps(_svi_pair(NoiseScaleModel), _batches())
    _assert_same(losses)
    assert len(messages) == 1 and "reads a tensor's value into Python (float()" in messages[0]


def test_4_dropout_then_eval_and_evaluate_loss():
    pair = _svi_pair(DropoutVAE)
    losses, messages = _steps(pair, _batches())
    _assert_same(losses)
    eager_model, compiled_model, eager, compiled = pair
    for model in (eager_model, compiled_model):
        model.eval()
    x = _data(10, seed=1)
    values = []
    for svi in (eager, compiled):
        torch.manual_seed(5)
        values.append(svi.evaluate_loss(x))
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    for model in (eager_model, compiled_model):
        model.train()
    more, more_messages = _steps(pair, _batches())
    _assert_same(more)
    assert not messages and not more_messages
    assert compiled._compiled.num_compiled == 3  # train (two shapes), eval


def test_5_python_random_augmentation_runs_eagerly():
    losses, messages = _steps(_svi_pair(AugmentedVAE), _batches())
    _assert_same(losses)
    assert len(messages) == 1 and "draws from Python's or NumPy's random" in messages[0]


def test_6_buffer_updated_in_place_between_steps_is_read_each_call():
    def cool(model, step):
        model.temperature.fill_(1.0 + step)

    pair = _svi_pair(TemperedVAE)
    losses, messages = _steps(pair, _batches(), before_step=cool)
    _assert_same(losses)
    assert not messages and pair[3]._compiled.num_compiled == 2


def test_6_buffer_updated_in_place_by_the_model_runs_eagerly():
    pair = _svi_pair(RunningMeanVAE)
    losses, messages = _steps(pair, _batches())
    _assert_same(losses)
    assert torch.allclose(pair[0].mean, pair[1].mean)  # updated once per call, as eagerly
    assert len(messages) == 1 and "updates a tensor it reads in place" in messages[0]


def test_7_mutated_numpy_argument_is_compared_by_value():
    weights = np.ones(D, dtype=np.float32)
    x = _data(10)
    pair = _svi_pair(WeightedVAE)

    def reweight(model, step):
        if model is pair[0]:  # the array both runs share, changed once per step
            weights[step % D] = 0.5 + step

    losses, messages = _steps(pair, [(x, weights)] * 5, before_step=reweight)
    _assert_same(losses)
    assert len(messages) == 1 and "argument 1 (a NumPy array) changed" in messages[0]


def test_8_step_inside_poutine_scale_runs_eagerly():
    pair = _svi_pair(UserVAE)
    losses, messages = _steps(pair, _batches(2), wrap=lambda: poutine.scale(scale=0.01))
    _assert_same(losses)
    assert messages == [
        "Trace_ELBO runs eagerly: an enclosing Pyro handler (ScaleMessenger) changes what "
        "it computes; pass jit_compile=False to silence this"
    ]
    # outside the handler the function is compiled as usual
    plain, messages = _steps(pair, _batches(2))
    _assert_same(plain)
    assert not messages and pair[3]._compiled.num_compiled == 2
    assert plain["eager"][0] / losses["eager"][0] > 50  # the handler was honoured: 0.01 x


def _branch_lae_model(decoder):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], Z]).to_event(1))
            logits = decoder(z)
            if x.mean() > 0.4:  # a data-dependent branch
                logits = 2.0 * logits
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    return model


def test_9_lae_on_a_data_dependent_branch_runs_eagerly():
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(Z, H), nn.Tanh(), nn.Linear(H, D))
    encoder = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, Z))
    runs = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileWarning)
        for jit in (False, "fx"):
            dec, enc = copy.deepcopy(decoder), copy.deepcopy(encoder)
            lae = LAE(
                _branch_lae_model(dec),
                enc,
                torch.optim.Adam([*dec.parameters(), *enc.parameters()], lr=0.01),
                step_size=1e-3,
                jit_compile=jit,
            )
            runs[jit] = []
            for step, (x,) in enumerate(_batches()):
                torch.manual_seed(step)
                runs[jit].append(lae.step(x))
    assert runs["fx"] == pytest.approx(runs[False], rel=1e-5)
    messages = [str(w.message) for w in caught if issubclass(w.category, CompileWarning)]
    assert len(messages) == 1
    assert messages[0].startswith("the potential runs eagerly: it reads a tensor's value")


def test_10_jit_trace_elbo_on_a_data_dependent_branch_runs_eagerly():
    pair = _svi_pair(BranchVAE, loss=Trace_ELBO, jit_loss=JitTrace_ELBO, jit_compile="fx")
    losses, messages = _steps(pair, _batches())
    _assert_same(losses)
    assert len(messages) == 1 and messages[0].startswith("JitTrace_ELBO runs eagerly: it reads")


def test_pyros_other_jit_elbos_are_refused_in_one_line():
    from pyro.infer import JitTraceGraph_ELBO

    m = UserVAE()
    with pytest.raises(ValueError, match="does not run JitTraceGraph_ELBO.*pass TraceGraph_ELBO"):
        ModuleSVI(m.model, m.guide, torch.optim.Adam(m.parameters()), loss=JitTraceGraph_ELBO())


# -- what compiles, compiles exactly --------------------------------------------------------


def test_user_vae_compiles_once_per_shape_and_takes_the_eager_steps():
    pair = _svi_pair(UserVAE)
    losses, messages = _steps(pair, _batches(6))
    _assert_same(losses)
    assert not messages and pair[3]._compiled.num_compiled == 2
    for a, b in zip(pair[0].parameters(), pair[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5)


class ConvVAE(UserVAE):
    """A convolutional decoder: operations with several outputs in the backward graph."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Sequential(
            nn.Linear(Z, 3 * (D + 2)), nn.Unflatten(-1, (3, D + 2)), nn.Conv1d(3, 1, 3)
        )

    def logits(self, z, x):
        return self.decoder(z).squeeze(-2)


def test_conv_vae_compiles_and_takes_the_eager_steps():
    pair = _svi_pair(ConvVAE)
    losses, messages = _steps(pair, _batches())
    _assert_same(losses)
    assert not messages and pair[3]._compiled.num_compiled == 2


def test_conv_potential_with_latent_gradients_compiles():
    """ALD's potential of a convolutional decoder: the latents' gradient needs the
    convolution's backward in the forward graph, and the weights' gradient one of its
    outputs in the backward graph (an operation with several outputs, split)."""
    m = ConvVAE()
    x = _data(5)
    spec = ap.inspect_model(m.model, (x,), {}, local_sites=["z"])[0]

    def potential(z, x):
        return -ap.log_joint(m.model, spec, {"z": z}, (x,), {})

    compiled = CompiledFunction(potential, backend="fx")
    z = torch.randn(5, Z, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        compiled(z, x)  # captured
        got = compiled(z, x)
    eager = potential(z, x)
    params = [z, *m.decoder.parameters()]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(eager, params)):
        assert torch.allclose(a, b, atol=1e-5)


class _ParamModel(nn.Module):
    """A module decoder and a constrained pyro.param, the plate size from the data."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(Z, 3)

    def model(self, x):
        scale = pyro.param("obs_scale", torch.tensor(0.7), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], Z]).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), scale).to_event(1), obs=x)


def _log_joint_of(m):
    """``(z, x) -> log p(x, z)`` of ``m.model`` (its sites inspected once, as ALD does)."""
    spec = ap.inspect_model(m.model, (torch.randn(2, 3),), {}, local_sites=["z"])[0]
    return lambda z, x: ap.log_joint(m.model, spec, {"z": z}, (x,), {})


def test_values_and_gradients_match_eager_and_params_reach_enclosing_handlers():
    m = _ParamModel()
    log_joint = _log_joint_of(m)
    compiled = CompiledFunction(log_joint, backend="fx")
    for n in (5, 5, 3, 5):
        x, z = torch.randn(n, 3), torch.randn(n, Z, requires_grad=True)
        eager = log_joint(z, x)
        with poutine.trace(param_only=True) as tr:
            got = compiled(z, x)
        assert "obs_scale" in tr.trace.nodes  # seen as in eager mode
        assert torch.allclose(got, eager, atol=1e-5)
        params = [z, *m.parameters(), pyro.param("obs_scale").unconstrained()]
        for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(eager, params)):
            assert torch.allclose(a, b, atol=1e-5)
    assert compiled.num_compiled == 2
    with torch.no_grad():  # an optimizer's in-place update reaches the graph
        pyro.param("obs_scale").unconstrained().add_(0.5)
        m.decoder.weight.mul_(2.0)
    assert torch.allclose(compiled(z, x), log_joint(z, x), atol=1e-5)


def test_the_drift_gradient_never_runs_the_parameter_backward():
    m = _ParamModel()
    compiled = CompiledFunction(_log_joint_of(m), backend="fx")
    x, z = torch.randn(4, 3), torch.randn(4, Z, requires_grad=True)
    compiled(z, x)  # captured
    entry = compiled._cache[next(iter(compiled._cache))][0]
    calls = []
    original = entry.replay.leaf_grads
    entry.replay.leaf_grads = lambda *a: calls.append(1) or original(*a)
    value = compiled(z, x)
    torch.autograd.grad(value, z, retain_graph=True)
    assert not calls
    value.backward()
    assert len(calls) == 1 and m.decoder.weight.grad is not None


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
        for jit in (False, "fx")
    ]
    values = []
    for kernel in kernels:
        torch.manual_seed(1)  # the same prior draw of the global site
        state = Chain(kernel, x).langevin
        values.append((state.potential, state.grad, kernel.potential(x)))
    for a, b in zip(*values):
        assert torch.allclose(a, b, atol=1e-5)
    compiled = kernels[1]._potential_of
    assert compiled.eager_reason is None and compiled.num_compiled == 2  # with, without grad


def test_random_draws_match_eager_and_capturing_draws_nothing_extra():
    def noisy(loc):
        return (loc + torch.randn(3)).square().sum()

    loc = torch.zeros(3)
    compiled = CompiledFunction(noisy, backend="fx")
    torch.manual_seed(1)
    first, second = compiled(loc), compiled(loc)
    after = torch.randn(())
    torch.manual_seed(1)
    assert torch.equal(first, noisy(loc)) and torch.allclose(second, noisy(loc))
    assert torch.equal(after, torch.randn(()))


def test_a_function_changing_its_own_state_runs_eagerly():
    class Counter(nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            return x.sum() * self.calls

    counter = Counter()
    compiled = CompiledFunction(counter, name="f", backend="fx")
    changes = "f runs eagerly: calling it changes Counter's attributes"
    with pytest.warns(CompileWarning, match=changes):
        assert compiled(torch.ones(2)) == 2.0
    assert compiled(torch.ones(2)) == 4.0 and counter.calls == 2


def test_non_scalar_output_runs_eagerly_with_one_warning():
    compiled = CompiledFunction(lambda x: {"a": x.sum()}, name="f", backend="fx")
    with pytest.warns(CompileWarning, match="f runs eagerly: it returned dict"):
        out = compiled(torch.ones(2))
    assert out["a"] == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per call
        compiled(torch.ones(2))


def test_graphs_are_bounded_and_so_are_compilations():
    compiled = CompiledFunction(lambda x: x.square().sum(), name="f", backend="fx")
    for n in range(1, MAX_CAPTURES + 1):
        compiled(torch.ones(n))
        assert compiled.num_compiled <= MAX_ENTRIES
    with pytest.warns(CompileWarning, match=f"compiled for {MAX_CAPTURES} input signatures"):
        assert compiled(torch.ones(MAX_CAPTURES + 1)) == MAX_CAPTURES + 1


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
    with pytest.raises(ValueError, match="jit_compile must be True, False or a backend"):
        ModuleSVI(lambda: None, lambda: None, torch.optim.Adam([torch.zeros(1)]), jit_compile=2)


# -- Inductor ---------------------------------------------------------------------------


def test_inductor_vae_takes_the_eager_steps():
    """The compiled kernels (Inductor), the ready VAE with the analytic KL: same losses,
    same random draws, same parameters, one graph pair for the batch shape."""
    torch.manual_seed(0)
    a = VAE(D, Z, hidden_dim=H)
    b = copy.deepcopy(a)
    sa = ModuleSVI(
        a.model, a.guide, torch.optim.Adam(a.parameters(), lr=1e-2), TraceMeanField_ELBO()
    )
    sb = ModuleSVI(
        b.model,
        b.guide,
        torch.optim.Adam(b.parameters(), lr=1e-2),
        TraceMeanField_ELBO(),
        jit_compile=True,
    )
    data = _data(20)
    for epoch in range(2):
        for batch in data.split(10):
            torch.manual_seed(epoch)
            la = sa.step(batch)
            torch.manual_seed(epoch)
            assert sb.step(batch) == pytest.approx(la, rel=1e-5, abs=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)
    assert sb._compiled.num_compiled == 1 and sb._compiled.eager_reason is None


@pytest.mark.slow
def test_inductor_lae_takes_the_eager_steps():
    torch.manual_seed(0)
    a = LangevinAutoencoder(D, Z, hidden_dim=16)
    b = copy.deepcopy(a)
    la = LAE(a.model, a.encoder, torch.optim.Adam(a.parameters(), lr=1e-2), step_size=1e-3)
    lb = LAE(
        b.model,
        b.encoder,
        torch.optim.Adam(b.parameters(), lr=1e-2),
        step_size=1e-3,
        jit_compile=True,
    )
    data = _data(14)
    for step in range(4):
        batch = data[:10] if step % 2 == 0 else data[10:]
        torch.manual_seed(step)
        va = la.step(batch)
        torch.manual_seed(step)
        assert lb.step(batch) == pytest.approx(va, rel=1e-5, abs=1e-4)
    # per batch shape: the transitions (with gradients) and the kernel's check (without)
    assert lb.kernel._potential_of.num_compiled == 4
