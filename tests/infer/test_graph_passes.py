"""graph_passes.simplify: Pyro's per-call bookkeeping leaves the compiled log joint, the
value and gradients stay the traced graph's, and nothing that depends on tensor values
(data-dependent shapes, in-place writes, dtype promotion) is folded."""

import math
import warnings

import pyro
import torch
from torch import nn

from pyro_lvm.infer import compile as compile_module
from pyro_lvm.infer import sites as ap
from pyro_lvm.infer.compile import CompiledFunction
from pyro_lvm.infer.graph_passes import simplify
from pyro_lvm.models import LangevinAutoencoder


def _graph(compiled: CompiledFunction) -> torch._C.Graph:
    (entry,) = compiled._cache.values()
    return entry.graph.graph


def _is_number(value: torch._C.Value, number: float) -> bool:
    return value.node().kind() == "prim::Constant" and value.toIValue() == number


def _kinds(graph: torch._C.Graph) -> list[str]:
    return [n.kind() for n in graph.nodes()]


def test_lae_log_joint_loses_pyros_bookkeeping_and_keeps_value_and_gradients():
    pyro.clear_param_store()
    torch.manual_seed(0)
    lvm = LangevinAutoencoder(6, 3, hidden_dim=8)
    x = torch.bernoulli(torch.full((5, 6), 0.4))
    spec = ap.inspect_model(lvm.model, (x,), {}, local_sites=["z"])[0]

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


def test_negations_move_to_the_reduced_value_or_cancel_exactly():
    def f(x, y):
        rows = (-x).sum(-1)  # sum(-x) = -sum(x): what torch.distributions and Pyro do
        scaled = (-x) / 3.0  # (-x) / c = -(x / c)
        thirds = (-scaled).sum(-1)  # -(-a) = a
        left = (-x.sum(-1)) - y.sum(-1)  # (-a) - b = -(a + b)
        out = y.square().sum(-1) + (-rows)  # a + (-b) = a - b
        right = thirds - left  # a - (-b) = a + b
        return -(out - right)  # -(a - b) = b - a

    compiled = CompiledFunction(f)
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randn(6, 4, requires_grad=True)
    got = compiled(x, y)
    assert "aten::neg" not in _kinds(_graph(compiled))  # every negation cancelled
    eager = f(x, y)
    assert torch.equal(got, eager)  # exact: negation commutes with rounding
    for a, b in zip(
        torch.autograd.grad(got.sum(), (x, y)), torch.autograd.grad(eager.sum(), (x, y))
    ):
        assert torch.equal(a, b)


def test_a_log_density_sum_becomes_one_reduction_per_term():
    """Normal(0, 1) and Bernoulli-logits log-densities as torch.distributions writes
    them, summed per row and then in total as Pyro does, and negated (the potential):
    one ``sum`` per term, the Bernoulli one folded into the loss's own sum reduction."""
    import torch.nn.functional as F

    log_sqrt_2pi = torch.tensor(0.5 * math.log(2 * math.pi), dtype=torch.float64)

    def potential(z, logits, x):
        normal = (-(z**2) / torch.tensor(2.0) - log_sqrt_2pi).sum(-1).sum()
        bernoulli = (
            (-F.binary_cross_entropy_with_logits(logits, x, reduction="none")).sum(-1).sum()
        )
        return -(normal + bernoulli)

    compiled = CompiledFunction(potential)
    z = torch.randn(50, 3, requires_grad=True)
    logits = torch.randn(50, 7, requires_grad=True)
    x = torch.bernoulli(torch.full((50, 7), 0.4))
    got = compiled(z, logits, x)
    nodes = list(_graph(compiled).nodes())
    kinds = [n.kind() for n in nodes]
    assert "aten::neg" not in kinds  # the potential's negation cancels the densities'
    assert kinds.count("aten::sum") == 1  # z^2 summed once; the 2 and the constant after
    (bce,) = [n for n in nodes if n.kind() == "aten::binary_cross_entropy_with_logits"]
    assert bce.inputsAt(4).toIValue() == 2  # reduction="sum"
    for n in nodes:  # the constant shift and the halving act on reduced values only
        if n.kind() in ("aten::div", "aten::add", "aten::sub"):
            assert n.output().type().sizes() == [], n
    eager = potential(z, logits, x)
    # the same additions in another order: float32 rounding of a sum of 500 terms
    assert torch.allclose(got, eager, rtol=1e-6, atol=0)
    for a, b in zip(
        torch.autograd.grad(got, (z, logits)), torch.autograd.grad(eager, (z, logits))
    ):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_learned_normals_negated_log_density_has_no_negation_left():
    def neg_log_q(z, loc, scale):  # a VAE guide's term, as torch.distributions writes it
        return -torch.distributions.Normal(loc, scale).log_prob(z).sum(-1).sum()

    compiled = CompiledFunction(neg_log_q)
    loc = torch.randn(40, 3, requires_grad=True)
    scale = torch.rand(40, 3).add(0.5).requires_grad_()
    z = torch.randn(40, 3)
    got = compiled(z, loc, scale)
    kinds = _kinds(_graph(compiled))
    assert "aten::neg" not in kinds and kinds.count("aten::sum") == 1, kinds
    eager = neg_log_q(z, loc, scale)
    assert torch.allclose(got, eager, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(got, (loc, scale)), torch.autograd.grad(eager, (loc, scale))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sums_fold_only_where_exact_or_a_reordering():
    def f(x, w):
        halves = (x / 2.0).sum()  # 2 is a power of two: sum(x / 2) = sum(x) / 2 exactly
        thirds = (x / 3.0).sum()  # not: stays elementwise
        per_row = (x * 3.0).sum(-1)  # a partial sum is not folded
        shared = x * 2.0  # used twice: its sum is not rewritten (no work saved)
        weighted = (x + w).sum()  # a tensor operand, not a constant: stays
        return halves + thirds + per_row.sum() + shared.sum() + shared.mean() + weighted

    compiled = CompiledFunction(f)
    x = torch.randn(40, 5, requires_grad=True)
    w = torch.randn(40, 5)
    got = compiled(x, w)
    nodes = list(_graph(compiled).nodes())
    # x / 3 still elementwise
    assert any(n.kind() == "aten::div" and n.output().type().sizes() == [40, 5] for n in nodes)
    halving = [n for n in nodes if n.kind() == "aten::div" and n.output().type().sizes() == []]
    assert len(halving) == 1 and halving[0].inputsAt(1).toIValue() == 2.0
    doubled = [n for n in nodes if n.kind() == "aten::mul" and _is_number(n.inputsAt(1), 2.0)]
    assert len(doubled) == 1  # computed once, for its sum and its mean alike
    assert {u.user.kind() for u in doubled[0].output().uses()} == {"aten::sum", "aten::mean"}
    assert any(n.kind() == "aten::add" and n.output().type().sizes() == [40, 5] for n in nodes)
    assert torch.allclose(got, f(x, w), rtol=1e-6)
    assert torch.equal((x / 2.0).sum(), x.sum() / 2.0)  # the exactness the fold relies on


def test_reductions_are_left_alone_in_graphs_with_in_place_writes():
    def f(a, b):
        a = a.clone()
        d = a - b
        a.add_(1.0)  # rewriting -(a - b) as b - a would read a after this write
        return (-d) * a  # a read after the write keeps it in the trace

    a, b = torch.randn(5, 3), torch.randn(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation note
        traced = torch.jit.trace(f, (a, b))
    simplified = torch._C._create_function_from_graph("f", simplify(traced.graph))
    assert torch.equal(simplified(a, b), f(a, b))


def _lae_and_vae_losses() -> list[float]:
    from pyro_lvm.infer import LAE, ModuleSVI
    from pyro_lvm.models import VAE

    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((30, 6), 0.3))
    lvm = LangevinAutoencoder(6, 2, hidden_dim=16)
    # mh=False: no accept decision that float rounding could flip on another machine
    optim = torch.optim.Adam(lvm.parameters())
    lae = LAE(lvm.model, lvm.encoder, optim, jit_compile=True, mh=False, step_size=1e-3)
    vae = VAE(6, 2, hidden_dim=16)
    svi = ModuleSVI(vae.model, vae.guide, torch.optim.Adam(vae.parameters()), jit_compile=True)
    batches = [x[:10], x[10:20], x[20:]]
    return [lae.step(b) for b in batches * 3] + [svi.step(b) for b in batches * 3]


def test_training_matches_the_unsimplified_graph_to_float_rounding(monkeypatch):
    simplified = _lae_and_vae_losses()
    monkeypatch.setattr(compile_module, "simplify", lambda graph: graph)
    plain = _lae_and_vae_losses()
    # the rewrites are exact but for the order of a sum's additions: every loss, step
    # after step, agrees to float32 rounding (a wrong constant or term would not)
    assert torch.allclose(torch.tensor(simplified), torch.tensor(plain), rtol=2e-6, atol=0)


def test_second_calls_with_other_values_match_eager():
    """Cases the compile-time check cannot see (it runs on the first call's values)."""

    def masked_shift(a):  # the masked size is data dependent: n in sum(x + c) is not fixed
        return (a[a > 0].abs() + 1.0).sum()

    def written_by_out(a):  # an out= write is a write: nothing is read past it
        x = a.clone()
        y = -x
        torch.abs(a, out=x)
        return y.sum() + x.sum()

    def cancelling_shift(x):  # terms of both signs: sum(x) - n c would cancel
        return (x - 1000.0).sum()

    cases = [
        (masked_shift, torch.tensor([1.0, -1.0, 2.0, -3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])),
        (written_by_out, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 2.0, -3.0])),
        (
            cancelling_shift,
            torch.randn(100_000, generator=torch.Generator().manual_seed(0)),
            1000 + 0.01 * torch.randn(100_000, generator=torch.Generator().manual_seed(1)),
        ),
    ]
    for fn, first, second in cases:
        compiled = CompiledFunction(fn)
        assert torch.equal(compiled(first), fn(first)), fn.__name__
        # eager sums the shifted terms; so must the compiled graph (rtol: float32 sums)
        assert torch.allclose(compiled(second), fn(second), rtol=1e-4, atol=1e-5), fn.__name__


def test_an_output_reduced_to_an_input_is_a_new_tensor():
    compiled = CompiledFunction(lambda x: torch.neg(torch.neg(x)))
    x = torch.randn(3, requires_grad=True)
    assert compiled(x) is not x
    x2 = torch.randn(3)
    before = x2.clone()
    compiled(x2).mul_(0)  # writing into the result leaves the input alone, as in eager
    assert torch.equal(x2, before)
