r"""Capture a scalar function of tensors as two ``aten`` graphs, compile them, replay them.

:func:`capture` records, with :func:`torch.fx.experimental.proxy_tensor.make_fx`, one
call of ``fn(*tensors)`` (a Pyro log density or ELBO: effect handlers, distributions,
networks) *together with its gradients*: the joint graph computes the value :math:`V`, the
gradient with respect to the arguments that require grad (the ALD latents) and the
gradients with respect to every other trainable tensor the value depends on (the *leaves*:
network parameters, Pyro params). It is then split in two:

* the **forward graph** computes :math:`V`, :math:`\partial V / \partial x` for the
  arguments :math:`x` and the intermediate values the rest needs;
* the **backward graph** computes :math:`\partial V / \partial \theta` for the leaves
  :math:`\theta` from those saved values.

Both are compiled with Inductor (:class:`_Compiled`) and replayed under two autograd
nodes (:class:`_ArgGrads`, :class:`_LeafGrads`) whose sum is the returned value. A
gradient with respect to the arguments only (the Langevin drift,
``torch.autograd.grad(V, position)``) runs the first node, which returns the saved
:math:`\partial V / \partial x`, and never the leaf gradients; a ``backward()`` to the
parameters runs the backward graph once. Eager autograd would instead walk the network
backward once per request. Higher-order gradients (``create_graph=True``) are not
supported by the replay.

Tensors the function reads besides its arguments become graph inputs, fetched on every
call: at their path in the Python state (:class:`~pyro_lvm.infer.compile_guards.StateGuard`),
as Pyro params by name (fetched with :func:`pyro.param`, so enclosing handlers see them as
they would in eager mode), or by reference.
"""

from __future__ import annotations

import math
import operator
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_lvm.infer.compile_guards import is_user_file

__all__ = ["CaptureError", "Replay", "capture", "trainable_leaves"]

#: Tensor methods that read values into Python: the value would be baked into a graph
_READS = {
    torch.Tensor.item: "item()",
    torch.Tensor.__bool__: "bool()",
    torch.Tensor.__float__: "float()",
    torch.Tensor.__int__: "int()",
    torch.Tensor.__index__: "an index",
    torch.Tensor.__complex__: "complex()",
    torch.Tensor.tolist: "tolist()",
    torch.Tensor.numpy: "numpy()",
    torch.Tensor.__array__: "a NumPy conversion",
    torch.equal: "torch.equal",
    torch.is_nonzero: "torch.is_nonzero",
}


class CaptureError(Exception):
    """The function cannot be captured exactly; the message says why (one line)."""


def _user_frame() -> str:
    """`` at file:line (code)`` of the innermost frame of the user's code on the stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if is_user_file(frame.filename):
            return f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}: {frame.line}"
    return ""


class _WatchReads(TorchFunctionMode):
    """Raise :class:`CaptureError` at the first read of a tensor's value into Python."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        what = _READS.get(func)
        if what is not None:
            raise CaptureError(
                f"it reads a tensor's value into Python ({what}{_user_frame()}), which a "
                "graph would bake in"
            )
        return func(*args, **(kwargs or {}))


class _WatchWrites(TorchDispatchMode):
    """Raise :class:`CaptureError` before an in-place update of a tensor that existed
    before the capture (a buffer, a parameter): the capture call must not repeat what the
    eager call did, and a graph could not replay it exactly. Tensors are told apart by
    storage: those the capture allocated may be updated (a random fill, an accumulation)."""

    def __init__(self):
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in _written_values(func, args, kwargs):
            if value.numel() and value.untyped_storage().data_ptr() not in self.storages:
                raise CaptureError(
                    f"it updates a tensor it reads in place ({func}{_user_frame()}), which a "
                    "replay would not repeat exactly: update buffers outside the model"
                )
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self.storages.add(t.untyped_storage().data_ptr())
        return out


def _written_values(func, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors an ``aten`` call writes to (in place or ``out=``)."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            out.extend(v for v in pytree.tree_leaves(value) if isinstance(v, Tensor))
    return out


def trainable_leaves(out: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """The leaf tensors requiring grad that ``out`` depends on other than through
    ``inputs`` (the walk stops at them: what produced them is the caller's graph)."""
    skip_ids = {id(t) for t in inputs}
    seen = {t.grad_fn for t in inputs if t.grad_fn is not None}
    stack, leaves = [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            if id(variable) not in skip_ids:
                leaves.append(variable)
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return leaves


def _dynamic_shape_op(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.dynamic_output_shape in tags or torch.Tag.data_dependent_output in tags


def _written(node: fx.Node) -> list[fx.Node]:
    """The argument nodes ``node`` writes to (an in-place or ``out=`` operation)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, fx.Node):
                out.append(value)
    return out


def _with_updates(graph: fx.Graph, nodes: set[fx.Node]) -> set[fx.Node]:
    """``nodes`` with the in-place updates of their values (and what those read)."""
    updates = [(n, _written(n)) for n in graph.nodes if n.op == "call_function"]
    updates = [(n, written) for n, written in updates if written]
    changed = True
    while changed:
        changed = False
        for node, written in updates:
            if node not in nodes and any(w in nodes for w in written):
                nodes |= _ancestors([node])
                changed = True
    return nodes


def _ancestors(nodes: Sequence[Any]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _subgraph(
    graph: fx.Graph, keep: set[fx.Node], inputs: list[fx.Node], outputs: list[Any]
) -> fx.GraphModule:
    new, env = fx.Graph(), {}
    for node in inputs:
        env[node] = new.placeholder(node.name)
    for node in graph.nodes:
        if node in keep and node not in env and node.op == "call_function":
            env[node] = new.node_copy(node, lambda n: env[n])
    new.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outputs))
    return fx.GraphModule(torch.nn.Module(), new)


class _ArgGrads(torch.autograd.Function):
    """``V`` with the saved gradient with respect to the arguments as its backward."""

    @staticmethod
    def forward(ctx, value, grads, *args):
        ctx.grads = grads
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None, None, *(None if g is None else grad * g for g in ctx.grads))


class _LeafGrads(torch.autograd.Function):
    """``value`` with the compiled backward graph as its backward (the leaf gradients)."""

    @staticmethod
    def forward(ctx, value, replay, saved, *leaves):
        ctx.replay, ctx.saved = replay, saved
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None, None, None, *ctx.replay.leaf_grads(ctx.saved, grad))


class Replay:
    """A captured function, compiled: ``replay(tensors, lifted) -> V`` (see the module
    docstring).

    Attributes
    ----------
    forward_graph : callable
        ``(*tensors, *lifted[, one]) -> (V, *argument gradients, *saved)``.
    backward_graph : callable or None
        ``(*inputs it reads, *saved, grad) -> leaf gradients``.
    """

    def __init__(self, forward_graph, backward_graph, layout: dict[str, Any]):
        self.forward_graph, self.backward_graph = forward_graph, backward_graph
        self.grad_args: tuple[int, ...] = layout["grad_args"]
        self.num_args: int = layout["num_args"]
        self.num_leaves: int = layout["num_leaves"]
        self.backward_inputs: tuple[int, ...] = layout["backward_inputs"]
        #: the gradient seed (a one) the forward graph takes as its last input, if any
        self.seed: Tensor | None = layout["seed"]
        #: operations in the captured joint graph
        self.ops: int = layout["ops"]

    def __call__(self, tensors: Sequence[Tensor], lifted: Sequence[Tensor]) -> Tensor:
        inputs = [t.detach() for t in tensors]
        inputs.extend(lifted)
        if self.seed is not None:
            inputs.append(self.seed)
        with torch.no_grad():
            out = self.forward_graph(*inputs)
        value = out[0]
        ng = len(self.grad_args)
        if ng:
            value = _ArgGrads.apply(value, out[1 : 1 + ng], *(tensors[i] for i in self.grad_args))
        if self.backward_graph is None:
            return value
        saved = [inputs[i] for i in self.backward_inputs]
        saved.extend(out[1 + ng :])
        leaves = inputs[self.num_args : self.num_args + self.num_leaves]
        if not ng:
            return _LeafGrads.apply(value, self, saved, *leaves)
        zero = value.new_zeros(())
        return value + _LeafGrads.apply(zero, self, saved, *leaves)

    def leaf_grads(self, saved: list[Tensor], grad: Tensor) -> tuple:
        with torch.no_grad():
            return self.backward_graph(*saved, grad)


class _Compiled:
    """``gm`` compiled by ``backend`` on its first call, for that call's input shapes
    (see :class:`~pyro_lvm.infer.compile.CompiledFunction` for the backends)."""

    def __init__(self, gm: fx.GraphModule, backend: str):
        self.gm, self.backend = gm, backend
        self.fn: Callable | None = gm if backend == "fx" else None

    def __call__(self, *inputs: Tensor):
        if self.fn is None:
            self.fn = self._compile(list(inputs))
        return self.fn(*inputs)

    def _compile(self, examples: list[Tensor]) -> Callable:
        # fallback_random: random draws made by aten's kernels from the global generator,
        # the numbers eager mode draws (Inductor's own generator would differ)
        if self.backend == "inductor":
            import torch._inductor  # imported when first needed: importing it takes seconds

            if hasattr(torch._inductor, "standalone_compile"):
                # Inductor's precompilation API straight on the captured graph: no second
                # capture by TorchDynamo, whose guards on the graph's inputs (ours check
                # them already) cost tens of microseconds per call; its compiled kernels
                # are cached on disk like torch.compile's
                with torch._inductor.config.patch(fallback_random=True):
                    return torch._inductor.standalone_compile(
                        self.gm, examples, dynamic_shapes="from_example_inputs"
                    )
            options = {"fallback_random": True}
            return torch.compile(self.gm.forward, fullgraph=True, dynamic=False, options=options)
        return torch.compile(self.gm.forward, backend=self.backend, fullgraph=True, dynamic=False)


def _trace(fn, examples, num_args, grad_args, grad_enabled) -> fx.GraphModule:
    """The joint graph of ``fn``: ``(*args, *leaves, seed) -> (V, *grads)``."""

    def joint(*inputs):
        args = inputs[:num_args]
        with _WatchReads(), _WatchWrites():
            value = fn(*args)
            targets = [args[i] for i in grad_args] + list(inputs[num_args:-1])
            if not targets:
                return (value,)
            seed = inputs[-1]
            grads = torch.autograd.grad(value, targets, grad_outputs=seed, allow_unused=True)
        return (value, *grads)

    from torch.fx.experimental.proxy_tensor import make_fx  # slow to import: when needed

    try:
        with torch.enable_grad() if grad_enabled else torch.no_grad():
            with pyro.validation_enabled(False):  # checks read values; eager ran them
                return make_fx(joint, tracing_mode="real")(*examples)
    except CaptureError:
        raise
    except Exception as err:  # noqa: BLE001 - any tracing failure: run eagerly
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CaptureError(f"tracing failed ({type(err).__name__}: {first[:160]})") from None


def _lift_constants(gm: fx.GraphModule, placeholders: list[fx.Node], lift) -> list[Callable]:
    """Turn the tensors the graph holds as constants into inputs (after the existing
    ones); per new input, the function fetching it."""
    graph, getters = gm.graph, []
    for node in list(graph.nodes):
        value = getattr(gm, node.target) if node.op == "get_attr" else None
        if not isinstance(value, Tensor):
            continue
        with graph.inserting_before(node):
            new = graph.placeholder(f"lifted_{len(getters)}")
        placeholders[-1].append(new)  # placeholders come first
        placeholders.append(new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if value.grad_fn is not None:
            raise CaptureError(
                "it reads a tensor with an autograd history that is not one of its "
                "arguments, whose gradient a replay would not pass on; pass it as an argument"
            )
        getter = lift(value)
        getters.append(getter if getter is not None else (lambda v=value: v))
    return getters


def _refuse_unreplayable(graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.op == "call_function" and _dynamic_shape_op(node):
            raise CaptureError(
                f"its output shapes depend on the data ({node.target}), which a graph "
                "captured for one input would fix"
            )


def capture(
    fn: Callable[..., Tensor],
    tensors: Sequence[Tensor],
    leaves: Sequence[Tensor],
    lift: Callable[[Tensor], Callable[[], Tensor] | None],
    backend: str,
    value: Tensor,
) -> tuple[Replay, list[Callable[[], Tensor]]]:
    """Capture ``fn(*tensors)`` with the gradients to the ``tensors`` that require grad
    and to ``leaves``; returns the :class:`Replay` and, per input beyond ``tensors`` (the
    leaves, then the other tensors the function read), a function fetching it on every
    call: ``lift(t)``, or one returning ``t`` itself where ``lift(t)`` is ``None``.
    ``value`` is the eager call's result (its dtype and device are the graph's).

    Raises
    ------
    CaptureError
        The function reads a tensor's value into Python, changes the shape of its
        output with the data, or updates a tensor it reads in place; or tracing failed.
    """
    grad_enabled = torch.is_grad_enabled()
    grad_args = tuple(i for i, t in enumerate(tensors) if t.requires_grad) if grad_enabled else ()
    leaves = list(leaves) if grad_enabled else []
    num_args = len(tensors)
    examples = [t.detach().requires_grad_(i in grad_args) for i, t in enumerate(tensors)]
    seed = torch.ones((), dtype=value.dtype, device=value.device)
    gm = _trace(fn, [*examples, *leaves, seed], num_args, grad_args, grad_enabled)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    seed_node = placeholders[-1]
    getters = [lift(leaf) or (lambda v=leaf: v) for leaf in leaves]
    getters += _lift_constants(gm, placeholders, lift)
    _refuse_unreplayable(graph)
    graph.eliminate_dead_code()
    output = next(n for n in graph.nodes if n.op == "output")
    outs = list(output.args[0])
    ng = len(grad_args)
    forward_outs, leaf_outs = outs[: 1 + ng], outs[1 + ng :]
    ops = sum(1 for n in graph.nodes if n.op == "call_function")
    keep = _with_updates(graph, _ancestors(forward_outs))
    # the forward graph's inputs: the tensors, the leaves, the lifted constants and,
    # when the argument gradients need it, the seed (the backward graph gets the
    # incoming gradient in its place, or scales its results by it)
    seeded = seed_node in keep
    inputs = [p for p in placeholders if p is not seed_node] + ([seed_node] if seeded else [])
    layout = dict(
        grad_args=grad_args,
        num_args=num_args,
        num_leaves=len(leaves),
        seed=seed if seeded else None,
        ops=ops,
    )
    if not any(isinstance(o, fx.Node) for o in leaf_outs):
        forward = _subgraph(graph, keep, inputs, forward_outs)
        layout["backward_inputs"] = ()
        return Replay(_Compiled(forward, backend), None, layout), getters
    # an operation with several outputs stays whole in the forward graph: the backward
    # graph reads its outputs (getitem), never the tuple
    keep |= {
        u
        for n in keep
        for u in n.users
        if u.op == "call_function" and u.target is operator.getitem
    }
    backward_nodes = _with_updates(graph, _ancestors(leaf_outs) | keep) - keep
    # what the backward graph reads from the forward one: values its operations use, and
    # leaf gradients the forward graph computes already
    direct = {o for o in leaf_outs if isinstance(o, fx.Node) and o not in backward_nodes}

    def read_by_backward(node: fx.Node) -> bool:
        return node in direct or any(u in backward_nodes for u in node.users)

    saved = [
        n for n in graph.nodes if n in keep and n.op == "call_function" and read_by_backward(n)
    ]
    read_inputs = [i for i, p in enumerate(inputs) if read_by_backward(p)]
    if any(not isinstance(n.meta.get("val"), Tensor) for n in saved):
        raise CaptureError("the split graphs would pass a non-tensor value (a compiler bug)")
    forward = _subgraph(graph, keep, inputs, [*forward_outs, *saved])
    backward = _backward_graph(
        graph,
        backward_nodes,
        [inputs[i] for i in read_inputs],
        saved,
        seed_node,
        seeded,
        leaf_outs,
    )
    layout["backward_inputs"] = tuple(read_inputs)
    return Replay(_Compiled(forward, backend), _Compiled(backward, backend), layout), getters


def _backward_graph(graph, nodes, read_inputs, saved, seed_node, seeded, leaf_outs):
    """``(*read_inputs, *saved, grad) -> leaf gradients`` from the joint graph's
    ``nodes``: the incoming gradient replaces the seed, or (when the forward graph used
    the seed) scales the results."""
    new, env = fx.Graph(), {}
    for node in [*read_inputs, *saved]:  # (a saved node may be a leaf gradient itself)
        env[node] = new.placeholder(node.name)
    grad = new.placeholder("grad_output")
    if not seeded:
        env[seed_node] = grad
    for node in graph.nodes:
        if node in nodes and node.op == "call_function":
            env[node] = new.node_copy(node, lambda n: env[n])
    outs = []
    for out in leaf_outs:
        if not isinstance(out, fx.Node):
            outs.append(None)  # an unused leaf
        elif seeded:
            outs.append(new.call_function(torch.ops.aten.mul.Tensor, (env[out], grad)))
        else:
            outs.append(env[out])
    new.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), new)


def close(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two values agree to float rounding (relative to the larger magnitude)."""
    if a is None or b is None:
        return (a is None or not bool(a.detach().abs().max() > 0)) and (
            b is None or not bool(b.detach().abs().max() > 0)
        )
    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    tol = 1e-4 if a.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    scale = 1.0 + float(b.abs().max())
    return math.isfinite(scale) and bool(torch.allclose(a, b, rtol=tol, atol=tol * scale))
