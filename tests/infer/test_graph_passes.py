"""graph_passes.simplify: Pyro's per-call bookkeeping leaves the compiled log joint, the
value and gradients stay the traced graph's, and nothing that depends on tensor values
(data-dependent shapes, in-place writes, dtype promotion) is folded."""

import warnings

import pyro
import torch
from torch import nn

from pyro_lvm.infer import compile as compile_module
from pyro_lvm.infer.compile import CompiledFunction
from pyro_lvm.infer.graph_passes import simplify
from pyro_lvm.infer.mcmc import ald_potential as ap
from pyro_lvm.models import LangevinAutoencoder


def _graph(compiled: CompiledFunction) -> torch._C.Graph:
    (entry,) = compiled._cache.values()
    return entry.graph.graph


def _kinds(graph: torch._C.Graph) -> list[str]:
    return [n.kind() for n in graph.nodes()]


def test_lae_log_joint_loses_pyros_bookkeeping_and_keeps_value_and_gradients():
    pyro.clear_param_store()
    torch.manual_seed(0)
    lvm = LangevinAutoencoder(6, 3, hidden_dim=8)
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    spec = ap.inspect_model(lvm.model, ["z"], (x,), {})[0]

    def log_joint(z, x):
        return ap.log_joint(lvm.model, spec, {"z": z}, (x,), {})

    compiled = CompiledFunction(log_joint)
    z = torch.randn(5, 3, requires_grad=True)
    got = compiled(z, x)
    kinds = _kinds(_graph(compiled))
    # sizes, the plate's arange and scale, the prior's zeros/ones, expands: all folded
    for gone in ("aten::size", "aten::arange", "aten::zeros", "aten::ones", "aten::expand"):
        assert gone not in kinds, gone
    assert "aten::broadcast_tensors" not in kinds
    eager = log_joint(z, x)
    params = [z, *lvm.decoder.parameters()]
    assert torch.allclose(got, eager, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(eager, params)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_data_dependent_sizes_stay_dynamic():
    def mean_of_positives(x):  # the count of positives is a size read of a masked select
        positive = x[x > 0]
        return positive.sum() / positive.shape[0]

    compiled = CompiledFunction(mean_of_positives)
    torch.manual_seed(1)
    for _ in range(4):  # same shape, different counts of positives
        x = torch.randn(50)
        assert torch.allclose(compiled(x), mean_of_positives(x))
    assert compiled.num_compiled == 1


def test_in_place_writes_keep_their_copy():
    def f(x):
        y = x * 1.0  # an identity, but y is written in place: x must not be
        y.add_(1.0)
        return y.sum() + x.sum()

    def through_a_view(x):
        y = x * 1.0
        y.view(-1).add_(1.0)  # written through a view of y, not y itself
        return y.sum() + x.sum()

    for fn in (f, through_a_view):
        compiled = CompiledFunction(fn)
        x = torch.randn(4, 3)
        before = x.clone()
        assert torch.allclose(compiled(x), fn(x))
        assert torch.equal(x, before)


def test_identities_only_where_shape_and_dtype_are_unchanged():
    def f(x):
        ones = torch.ones(4, 3, dtype=torch.float64)  # promotes x: not an identity
        zeros = torch.zeros(2, 4, 3)  # broadcasts x: not an identity
        return (x * ones).sum() + (x + zeros).sum(0).square().sum()

    compiled = CompiledFunction(f)
    x = torch.randn(4, 3)
    got = compiled(x)
    assert got.dtype == torch.float64
    assert torch.allclose(got, f(x))


def test_uniform_constants_become_scalars_without_changing_the_result():
    def f(x):
        twos = torch.full((4, 3), 2.0)
        return (x / twos).sum() + (twos * x).square().sum()

    compiled = CompiledFunction(f)
    x = torch.randn(4, 3, requires_grad=True)
    got = compiled(x)
    graph = _graph(compiled)
    constants = [n.output().toIValue() for n in graph.nodes() if n.kind() == "prim::Constant"]
    assert all(c.dim() == 0 for c in constants if isinstance(c, torch.Tensor))
    assert torch.allclose(got, f(x))
    (g_got,), (g_eager,) = torch.autograd.grad(got, x), torch.autograd.grad(f(x), x)
    assert torch.allclose(g_got, g_eager)


def test_simplify_copies_and_leaves_a_scripted_graph_with_control_flow_alone():
    def body(x: torch.Tensor, n: int) -> torch.Tensor:
        for _ in range(n):
            x = x * 1.0 + x.size(0)
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation
        loop = torch.jit.script(body)

    before = str(loop.graph)
    simplified = simplify(loop.graph)
    assert str(loop.graph) == before  # a copy is simplified
    fn = torch._C._create_function_from_graph("loop", simplified)
    x = torch.randn(3)
    assert torch.equal(fn(x, 2), loop(x, 2))


def test_module_parameters_stay_inputs():
    net = nn.Linear(3, 2)
    compiled = CompiledFunction(lambda x: net(x).square().sum())
    x = torch.randn(5, 3)
    first = compiled(x)
    with torch.no_grad():
        net.weight.mul_(2.0)  # an optimizer step: the replay reads the new weights
    assert not torch.allclose(compiled(x), first)
    assert torch.allclose(compiled(x), net(x).square().sum())


def test_negations_move_to_the_reduced_value():
    def f(x, y):
        rows = (-x).sum(-1)  # torch.distributions negates every element, Pyro sums
        return y.square().sum() + (-rows.sum())

    compiled = CompiledFunction(f)
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    got = compiled(x, y)
    graph = _graph(compiled)
    negs = [n for n in graph.nodes() if n.kind() == "aten::neg"]
    assert all(n.output().type().sizes() == [] for n in negs)  # none on a full tensor
    eager = f(x, y)
    assert torch.equal(got, eager)  # exact: negation commutes with rounding
    for a, b in zip(torch.autograd.grad(got, (x, y)), torch.autograd.grad(eager, (x, y))):
        assert torch.equal(a, b)


def _lae_and_vae_losses() -> list[float]:
    from pyro_lvm.infer import LAE, ModuleSVI
    from pyro_lvm.models import VAE

    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((30, 6), 0.3))
    lvm = LangevinAutoencoder(6, 2, hidden_dim=16)
    lae = LAE(lvm.model, lvm.encoder, torch.optim.Adam(lvm.parameters()), jit_compile=True)
    vae = VAE(6, 2, hidden_dim=16)
    svi = ModuleSVI(vae.model, vae.guide, torch.optim.Adam(vae.parameters()), jit_compile=True)
    batches = [x[:10], x[10:20], x[20:]]
    return [lae.step(b) for b in batches * 3] + [svi.step(b) for b in batches * 3]


def test_training_is_bit_identical_with_and_without_simplification(monkeypatch):
    simplified = _lae_and_vae_losses()
    monkeypatch.setattr(compile_module, "simplify", lambda graph: graph)
    plain = _lae_and_vae_losses()
    assert simplified == plain  # exact rewrites: the same floats, step after step
