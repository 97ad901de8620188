r"""Simplify a traced graph for its signature: what Pyro's bookkeeping leaves behind.

A model's log joint traced by :class:`~pyro_lvm.infer.compile.CompiledFunction` records
every tensor operation Pyro and ``torch.distributions`` run, most of which do nothing for
a fixed input signature: size reads turned into tensors and back (``aten::size``,
``prim::NumToTensor``, ``aten::Int``), the plate's scale :math:`N/n = 1` computed and
multiplied in, a standard normal's ``zeros``/``ones`` broadcast, expanded, squared and
logged, ``x - 0``, ``x / 1``, a reshape or an expand to the shape a tensor already has,
``0 + log_p``. Each costs a dispatch forward and an autograd node backward; for the
digits-size LAE log joint they were a quarter of its forward-and-backward time.

:func:`simplify` removes them with rewrites valid for the signature the graph is
replayed on (the compiled graph is keyed on every input's shape, dtype and device):

1. **Sizes become constants** where they are a function of the input shapes alone:
   ``aten::size``, ``aten::numel`` and ``aten::dim`` of a tensor whose shape no
   data-dependent operation (``nonzero``, boolean indexing, ``unique``...) reaches.
2. **Constant propagation** (TorchScript's own pass) folds what now depends on constants
   alone: the plate scale, the prior's parameters and their logarithms.
3. **Identities**: ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0``, ``0 + x``, ``1 * x`` (the
   constant an all-ones or all-zeros tensor or number), ``expand``, ``reshape``,
   ``view`` and ``broadcast_tensors`` to the shape a tensor already has, each only
   where the result has the same dtype and shape as the operand and no in-place
   operation writes into it. IEEE arithmetic makes each of these exact, NaN and
   infinity included (``-0.0 + 0`` is ``+0.0``: a sign of zero, never a value).
4. **Negations move to the reduced value or cancel**: ``sum(-x) = -sum(x)``,
   ``(-x) * c = -(x * c)`` and ``(-x) / c = -(x / c)`` (``c`` no larger than ``x``),
   ``a + (-b) = a - b``, ``a - (-b) = a + b``, ``(-a) - b = -(a + b)``,
   ``-(a - b) = b - a``, ``-(-x) = x``. ``torch.distributions`` negates every element
   of a log-density and a potential negates the log joint, so the negations cancel.
   Exact: IEEE rounding is symmetric under negation.
5. **Full sums fold into what they reduce** (operands used once only):
   ``sum(sum(x, dims)) = sum(x)``; ``sum(x + c) = sum(x) + n c`` for a constant number
   ``c`` (Pyro sums each site per data point, then over the plate; a log-density's
   normalising constant is added to every element), only where ``n`` is fixed by the
   signature and every term ``x_i + c`` has the sign of ``c`` (``x`` is a square, an
   ``exp``... scaled, negated, summed; see ``_sign``), so no cancellation makes the
   reordered sum less accurate than the original; ``sum(x * 2^k) = sum(x) * 2^k`` (the
   Normal's ``/ 2``); and the sum of an elementwise ``binary_cross_entropy_with_logits``
   becomes its own ``reduction="sum"`` (the same kernel and summation). The first two
   add the same terms in another order: the value changes by float rounding, as with
   any other reduction kernel, and where partial sums overflow the result may differ
   (``inf - inf`` in one order, finite in another); the power-of-two scaling is exact
   but for overflow and subnormal underflow. For the digits-size LAE potential this
   leaves the hand-written graph: ``sum(z^2) / 2 + const + BCE(logits, x, "sum")`` after
   the decoder.
6. Dead code elimination; an output the identities reduced to an input is cloned, as
   eager would return a new tensor.

Rules 4 and 5 read operands where the rewritten node stands, so they are skipped in a
graph with any write into a tensor (an in-place ``op_`` or an ``out=`` overload).

The caller checks the simplified graph against the eager value, as for the traced one.

References
----------
TorchScript's ``ConstantPropagation`` and ``EliminateDeadCode`` passes
(``torch/csrc/jit/passes``), which this builds on.
"""

from __future__ import annotations

import math

import torch

__all__ = ["simplify"]

#: operations whose output shape (or number) depends on tensor values, not shapes;
#: ``aten::index`` only with boolean masks (see ``_dynamic_values``)
DATA_DEPENDENT = frozenset(
    {
        "aten::nonzero",
        "aten::nonzero_numpy",
        "aten::argwhere",
        "aten::masked_select",
        "aten::unique",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::_unique",
        "aten::_unique2",
        "aten::repeat_interleave",
        "aten::bincount",
        "aten::where",  # the one-argument form is nonzero
        "aten::item",
        "aten::_local_scalar_dense",
        "aten::tolist",
        "aten::Int",
        "aten::Float",
        "aten::IntImplicit",
        "aten::ScalarImplicit",
    }
)
#: numbers read back from a tensor the tracer made of a number (``prim::NumToTensor``)
NUMBER_READS = frozenset({"aten::Int", "aten::Float", "aten::IntImplicit", "aten::ScalarImplicit"})


def _sizes(value: torch._C.Value) -> tuple | None:
    t = value.type()
    if not isinstance(t, torch._C.TensorType):
        return None
    sizes = t.sizes()
    return None if sizes is None or any(s is None for s in sizes) else tuple(sizes)


def _dtype(value: torch._C.Value):
    t = value.type()
    return t.dtype() if isinstance(t, torch._C.TensorType) else None


def _dynamic_values(graph: torch._C.Graph) -> set[str]:
    """Names of the values whose shape (or, for ints, value) may depend on tensor values.

    Graph inputs are static (the signature fixes their shapes). A node's outputs are
    dynamic when it reads a dynamic value or produces values from tensor contents
    (``DATA_DEPENDENT_SHAPES``); factories and views whose shape arguments are all
    static are static. Nodes with sub-blocks (control flow) make everything after them
    dynamic: a traced graph has none, a scripted one is left alone.
    """
    dynamic: set[str] = set()
    for node in graph.nodes():
        if list(node.blocks()):
            return {v.debugName() for n in graph.nodes() for v in n.outputs()}
        inputs = list(node.inputs())
        kind = node.kind()
        if kind in NUMBER_READS and inputs[0].node().kind() == "prim::NumToTensor":
            data_dependent = False  # a size the tracer wrapped in a tensor, read back
        elif kind == "aten::index":
            data_dependent = len(inputs) < 2 or any(
                isinstance(v.type(), torch._C.TensorType)
                and _dtype(v) in (torch.bool, torch.uint8, None)
                for v in _list_elements(inputs[1])
            )
        else:
            data_dependent = kind in DATA_DEPENDENT
        if data_dependent or any(v.debugName() in dynamic for v in inputs):
            dynamic.update(v.debugName() for v in node.outputs())
    return dynamic


def _list_elements(value: torch._C.Value) -> list[torch._C.Value]:
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        return list(node.inputs())
    return [value]


def _fold_sizes(graph: torch._C.Graph) -> None:
    dynamic = _dynamic_values(graph)
    for node in list(graph.nodes()):
        kind = node.kind()
        if kind not in ("aten::size", "aten::numel", "aten::dim"):
            continue
        inputs = list(node.inputs())
        tensor = inputs[0]
        sizes = _sizes(tensor)
        if sizes is None or tensor.debugName() in dynamic:
            continue
        if kind == "aten::size":
            if len(inputs) == 1:
                value = list(sizes)
            else:
                dim = inputs[1].toIValue()
                if not isinstance(dim, int):
                    continue
                value = sizes[dim]
        elif kind == "aten::numel":
            value = 1
            for s in sizes:
                value *= s
        else:
            value = len(sizes)
        with graph.insert_point_guard(node):
            constant = graph.insertConstant(value)
        node.output().replaceAllUsesWith(constant)


def _constant(value: torch._C.Value):
    """The Python value of a constant (a number or tensor), else ``None``."""
    if value.node().kind() != "prim::Constant":
        return None
    try:
        return value.toIValue()
    except RuntimeError:
        return None


def _is_all(value: torch._C.Value, number: float) -> bool:
    c = _constant(value)
    if isinstance(c, bool) or c is None:
        return False
    if isinstance(c, (int, float)):
        return c == number
    if isinstance(c, torch.Tensor):
        return c.numel() > 0 and bool((c == number).all())
    return False


def _same_type(a: torch._C.Value, b: torch._C.Value) -> bool:
    sa, sb = _sizes(a), _sizes(b)
    return sa is not None and sa == sb and _dtype(a) == _dtype(b) and _dtype(a) is not None


def _written_in_place(value: torch._C.Value) -> bool:
    return any(_mutates(use.user) for use in value.uses())


def _identity_operand(node: torch._C.Node) -> torch._C.Value | None:
    """The operand ``node`` returns unchanged, if it is an identity."""
    kind, inputs = node.kind(), list(node.inputs())
    if kind in ("aten::mul", "aten::div") and len(inputs) == 2:
        if _is_all(inputs[1], 1):
            return inputs[0]
        if kind == "aten::mul" and _is_all(inputs[0], 1):
            return inputs[1]
    if kind in ("aten::add", "aten::sub") and len(inputs) == 3 and _is_all(inputs[2], 1):
        if _is_all(inputs[1], 0):
            return inputs[0]
        if kind == "aten::add" and _is_all(inputs[0], 0):
            return inputs[1]
    if kind in ("aten::expand", "aten::reshape", "aten::view", "aten::contiguous"):
        return inputs[0]
    return None


#: elementwise binary operations: a uniform constant operand may be a 0-d one
ELEMENTWISE = frozenset({"aten::add", "aten::sub", "aten::mul", "aten::div"})


def _shrink_uniform_constants(graph: torch._C.Graph, node: torch._C.Node) -> None:
    """A constant tensor operand holding one value throughout becomes a 0-d constant
    (one scalar read instead of a full tensor), where the other operand alone already
    has the result's shape and dtype, so broadcasting gives the same result."""
    inputs = list(node.inputs())
    for i, j in ((0, 1), (1, 0)):
        c = _constant(inputs[i])
        if not isinstance(c, torch.Tensor) or c.dim() == 0 or c.numel() == 0:
            continue
        if not _same_type(node.output(), inputs[j]):
            continue
        flat = c.reshape(-1)
        if not bool((flat == flat[0]).all()):
            continue
        with graph.insert_point_guard(node):
            scalar = graph.insertConstant(flat[0].clone())
        node.replaceInput(i, scalar)


def _has_in_place(graph: torch._C.Graph) -> bool:
    return any(_mutates(node) for node in graph.nodes())


def _mutates(node: torch._C.Node) -> bool:
    """Whether ``node`` writes into a tensor: an in-place ``op_`` or an ``out=`` overload
    (a schema argument marked ``(a!)``)."""
    kind = node.kind()
    if kind.endswith("_") and not kind.endswith("__"):
        return True
    try:
        return "!" in node.schema()
    except RuntimeError:  # pragma: no cover - nodes without a schema
        return False


def _remove_identities(graph: torch._C.Graph) -> None:
    # an arithmetic identity returns a new tensor: with any in-place write in the graph
    # (perhaps through a view of it) the copy may matter, so only views are removed then
    arithmetic = not _has_in_place(graph)
    for node in list(graph.nodes()):
        if node.kind() == "prim::ListUnpack":
            _unpack_broadcast(node)
            continue
        if node.kind() in ELEMENTWISE and node.inputsSize() >= 2:
            _shrink_uniform_constants(graph, node)
        if node.outputsSize() != 1:
            continue
        if not arithmetic and node.kind() in ELEMENTWISE:
            continue
        operand = _identity_operand(node)
        out = node.output()
        if operand is None or not _same_type(out, operand) or _written_in_place(out):
            continue
        if _written_in_place(operand):
            continue
        out.replaceAllUsesWith(operand)


def _unpack_broadcast(unpack: torch._C.Node) -> None:
    """``broadcast_tensors([a, b...])`` whose operands already share the result's shape."""
    source = unpack.input().node()
    if source.kind() != "aten::broadcast_tensors":
        return
    operands = _list_elements(source.input())
    outputs = list(unpack.outputs())
    if len(operands) != len(outputs):
        return
    if all(_same_type(o, a) and not _written_in_place(o) for o, a in zip(outputs, operands)):
        for o, a in zip(outputs, operands):
            o.replaceAllUsesWith(a)


def _floating(value: torch._C.Value) -> bool:
    dtype = _dtype(value)
    return dtype is not None and dtype.is_floating_point


def _single_neg(value: torch._C.Value) -> torch._C.Value | None:
    """``x`` if ``value`` is ``neg(x)`` of a floating tensor used once, else ``None``."""
    node = value.node()
    if node.kind() != "aten::neg" or len(value.uses()) != 1 or not _floating(value):
        return None
    return node.input()


def _is_none(value: torch._C.Value) -> bool:
    return value.type().kind() == "NoneType"


def _full_sum_operand(node: torch._C.Node) -> torch._C.Value | None:
    """``x`` if ``node`` is ``sum(x)`` over every element (no dtype), else ``None``."""
    if node.kind() != "aten::sum" or node.inputsSize() != 2 or not _is_none(node.inputsAt(1)):
        return None
    return node.inputsAt(0)


def _partial_sum_operand(node: torch._C.Node) -> torch._C.Value | None:
    """``x`` if ``node`` is ``sum(x, dims)`` (no keepdim, no dtype), else ``None``."""
    if node.kind() != "aten::sum" or node.inputsSize() != 4:
        return None
    if _constant(node.inputsAt(2)) is not False or not _is_none(node.inputsAt(3)):
        return None
    return node.inputsAt(0)


def _scalar_constant(value: torch._C.Value) -> float | None:
    """The number a constant number or one-element constant tensor holds (finite)."""
    c = _constant(value)
    if isinstance(c, torch.Tensor):
        c = float(c) if c.numel() == 1 else None
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
        return None
    return float(c)


def _power_of_two(c: float | None) -> bool:
    return c is not None and c != 0 and math.frexp(abs(c))[0] == 0.5


#: elementwise operations whose result is never negative
NONNEGATIVE = frozenset(
    {"aten::abs", "aten::exp", "aten::relu", "aten::sigmoid", "aten::softplus", "aten::sqrt"}
)


def _sign(value: torch._C.Value) -> int:
    """+1 if every element of ``value`` is >= 0, -1 if every one is <= 0, else 0
    (unknown), from how it is computed."""
    node = value.node()
    kind, inputs = node.kind(), list(node.inputs())
    if kind in NONNEGATIVE:
        return 1
    if kind == "aten::pow" and len(inputs) == 2:
        k = _constant(inputs[1])
        even = isinstance(k, (int, float)) and math.isfinite(k) and k == int(k) and k % 2 == 0
        return 1 if even else 0
    if kind == "aten::neg":
        return -_sign(inputs[0])
    if kind == "aten::sum":
        return _sign(inputs[0])
    if kind in ("aten::mul", "aten::div") and len(inputs) == 2:
        c = _scalar_constant(inputs[1])
        return 0 if not c else _sign(inputs[0]) * (1 if c > 0 else -1)
    return 0


def _emit(graph, before: torch._C.Node, kind: str, inputs: list, like: torch._C.Value):
    """Insert ``kind(*inputs)`` before ``before``, typed as ``like``; its output."""
    node = graph.create(kind, inputs)
    node.insertBefore(before)
    node.output().setType(like.type())
    return node.output()


def _number(graph, before: torch._C.Node, value) -> torch._C.Value:
    with graph.insert_point_guard(before):
        return graph.insertConstant(value)


def _unit_alpha(node: torch._C.Node) -> bool:
    return node.inputsSize() == 3 and _is_all(node.inputsAt(2), 1)


def _negation_rewrite(graph: torch._C.Graph, node: torch._C.Node) -> bool:
    """Move one negation towards the output (or cancel it); exact (see the docstring)."""
    kind, out = node.kind(), node.output() if node.outputsSize() == 1 else None
    if out is None or not _floating(out):
        return False
    if kind == "aten::sum":  # sum(-x) = -sum(x)
        inner = _single_neg(node.inputsAt(0))
        if inner is None:
            return False
        node.replaceInput(0, inner)
        neg = graph.create("aten::neg", [out])
        neg.insertAfter(node)
        neg.output().setType(out.type())
        out.replaceAllUsesAfterNodeWith(neg, neg.output())
        return True
    if kind == "aten::neg":
        inner = node.input().node()
        if inner.kind() == "aten::neg":  # -(-x) = x
            out.replaceAllUsesWith(inner.input())
            return True
        if inner.kind() == "aten::sub" and _unit_alpha(inner) and len(node.input().uses()) == 1:
            a, b, one = inner.inputsAt(0), inner.inputsAt(1), inner.inputsAt(2)
            if _floating(a) and _floating(b):  # -(a - b) = b - a
                out.replaceAllUsesWith(_emit(graph, node, "aten::sub", [b, a, one], out))
                return True
        return False
    if kind in ("aten::mul", "aten::div") and node.inputsSize() == 2:
        # (-x) * c = -(x * c), (-x) / c = -(x / c): where x has the result's shape (the
        # negation does not grow) and c is a floating tensor or a constant number
        for i in (0, 1) if kind == "aten::mul" else (0,):
            x, c = _single_neg(node.inputsAt(i)), node.inputsAt(1 - i)
            if x is None or not _same_type(out, x):
                continue
            if not (_floating(c) or _scalar_constant(c) is not None):
                continue
            product = _emit(graph, node, kind, [x, c], out)  # x first: mul commutes
            out.replaceAllUsesWith(_emit(graph, node, "aten::neg", [product], out))
            return True
        return False
    if kind in ("aten::add", "aten::sub") and _unit_alpha(node):
        a, b, one = node.inputsAt(0), node.inputsAt(1), node.inputsAt(2)
        if not (_floating(a) and _floating(b)):
            return False
        if kind == "aten::sub":
            inner = _single_neg(b)
            if inner is not None:  # a - (-b) = a + b
                out.replaceAllUsesWith(_emit(graph, node, "aten::add", [a, inner, one], out))
                return True
            inner = _single_neg(a)
            if inner is not None and _same_type(out, inner):  # (-a) - b = -(a + b)
                total = _emit(graph, node, "aten::add", [inner, b, one], out)
                out.replaceAllUsesWith(_emit(graph, node, "aten::neg", [total], out))
                return True
            return False
        for left, right in ((a, b), (b, a)):  # a + (-b) = a - b, (-a) + b = b - a
            inner = _single_neg(right)
            if inner is not None:
                difference = _emit(graph, node, "aten::sub", [left, inner, one], out)
                out.replaceAllUsesWith(difference)
                return True
    return False


#: ``torch.nn.functional``'s reduction codes (``at::Reduction``)
REDUCTION_NONE, REDUCTION_SUM = 0, 2


def _sum_rewrite(graph: torch._C.Graph, node: torch._C.Node) -> bool:
    """Fold a full sum into what it reduces (see the docstring, item 5)."""
    source = _full_sum_operand(node)
    if source is None or len(source.uses()) != 1 or not _floating(source):
        return False
    out, inner = node.output(), source.node()
    kind = inner.kind()
    if _partial_sum_operand(inner) is not None:  # sum(sum(x, dims)) = sum(x)
        node.replaceInput(0, inner.inputsAt(0))
        return True
    if kind == "aten::binary_cross_entropy_with_logits" and inner.inputsSize() == 5:
        if _constant(inner.inputsAt(4)) != REDUCTION_NONE:
            return False
        reduction = _number(graph, node, REDUCTION_SUM)
        inputs = [*list(inner.inputs())[:4], reduction]
        out.replaceAllUsesWith(_emit(graph, node, kind, inputs, out))
        return True
    if kind in ELEMENTWISE and inner.inputsSize() >= 2:
        operands = list(inner.inputs())[:2]
        for i in (0, 1) if kind in ("aten::add", "aten::mul") else (0,):
            x, c = operands[i], _scalar_constant(operands[1 - i])
            if c is None or not _same_type(source, x):
                continue
            if kind in ("aten::mul", "aten::div"):
                if inner.inputsSize() != 2 or not _power_of_two(c):
                    continue
                # sum(x * 2^k) = sum(x) * 2^k: scaling by a power of two is exact
                total = _emit(graph, node, "aten::sum", [x, node.inputsAt(1)], out)
                scaled = [total, _number(graph, node, c)]
                out.replaceAllUsesWith(_emit(graph, node, kind, scaled, out))
                return True
            shift = c if kind == "aten::add" else -c
            if not _unit_alpha(inner) or source.debugName() in _dynamic_values(graph):
                continue  # n is the traced size: only for shapes fixed by the signature
            if _sign(x) * shift < 0 or (_sign(x) == 0 and shift != 0):
                continue  # terms of either sign: sum(x) + n c could cancel catastrophically
            # sum(x + c) = sum(x) + n c: the same additions, in another order
            numel = math.prod(_sizes(source))
            total = _emit(graph, node, "aten::sum", [x, node.inputsAt(1)], out)
            shifted = [total, _number(graph, node, c * numel), inner.inputsAt(2)]
            out.replaceAllUsesWith(_emit(graph, node, kind, shifted, out))
            return True
    return False


def _rewrite_reductions(graph: torch._C.Graph) -> None:
    """Apply :func:`_negation_rewrite` and :func:`_sum_rewrite` until none applies, one
    rewrite at a time (each pass removes the dead nodes, so use counts stay true).

    Negations only move towards the output or cancel and sums only move towards the
    inputs, so the rewrites run out; the bound on their number is a guard."""
    for _ in range(10 * sum(1 for _ in graph.nodes()) + 10):
        for node in graph.nodes():
            if _negation_rewrite(graph, node) or _sum_rewrite(graph, node):
                torch._C._jit_pass_dce(graph)
                break
        else:
            return


def simplify(graph: torch._C.Graph) -> torch._C.Graph:
    """A simplified copy of a traced ``graph`` (see the module docstring)."""
    graph = graph.copy()
    _fold_sizes(graph)
    torch._C._jit_pass_constant_propagation(graph)
    _remove_identities(graph)
    torch._C._jit_pass_dce(graph)
    torch._C._jit_pass_constant_propagation(graph)
    _remove_identities(graph)
    if not _has_in_place(graph):
        _rewrite_reductions(graph)
    torch._C._jit_pass_dce(graph)
    _fresh_outputs(graph)
    return graph


def _fresh_outputs(graph: torch._C.Graph) -> None:
    """An output that identities reduced to an input (``-(-x)``, ``x * 1``) is cloned, as
    eager returns a new tensor: writing into the result must not write into the input."""
    ret = graph.return_node()
    for i, value in enumerate(list(ret.inputs())):
        tensor = isinstance(value.type(), torch._C.TensorType)
        if value.node().kind() != "prim::Param" or not tensor:
            continue
        with graph.insert_point_guard(ret):
            none = graph.insertConstant(None)
        clone = graph.create("aten::clone", [value, none])
        clone.insertBefore(ret)
        clone.output().setType(value.type())
        ret.replaceInput(i, clone.output())
