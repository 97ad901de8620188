r"""The compiled path: a Pyro computation captured once, compiled by Inductor, guarded.

A Pyro model's log density or an ELBO is ordinary PyTorch work wrapped in effect
handlers: every call builds messages, traces and distribution objects, a fixed Python
cost per call that weighs on the small networks of latent variable models.
:class:`CompiledFunction` removes it on PyTorch's supported stack (``torch.fx``'s
:func:`~torch.fx.experimental.proxy_tensor.make_fx` and Inductor, ``torch.compile``'s
compiler):

1. **The first call of a signature runs eagerly** and is what the caller gets back. The
   signature holds every tensor argument's shape, strides, dtype, device and
   ``requires_grad``, the other arguments' types, the grad mode, autocast and the default
   dtype; a short last minibatch is one more signature.
2. **Checked before capturing.** The call must return one scalar tensor and must not
   change any Python value reachable from the function (``self.calls += 1``) nor draw
   from Python's or NumPy's random generators: a replay would do neither.
3. **Captured with its gradients** (:mod:`~pyro_lvm.infer.compile_graph`): the value and
   its gradients as ``aten`` graphs, split so that a gradient with respect to the
   arguments (the Langevin drift) never computes the parameter gradients. A read of a
   tensor's value into Python (``if x.mean() > t``, ``float(x.std())``), an output whose
   shape depends on the data, or an in-place update of a tensor that existed before the
   call refuses the capture.
4. **Compiled** by Inductor (its precompilation API ``torch._inductor.standalone_compile``,
   cached on disk; :func:`torch.compile` where it is absent; on CUDA it emits Triton
   kernels), with random draws made by the same kernels as eager mode, and **verified**:
   the compiled value and gradients must equal the eager call's (same random numbers) to
   float rounding.
5. **Guarded** on every later call (:mod:`~pyro_lvm.infer.compile_guards`): the other
   arguments (scalars and NumPy arrays by value, objects by identity) and the Python
   state the function can reach (``self.beta``, modules' ``training`` flags, the user's
   globals, NumPy arrays, closure cells) must equal its snapshot, and no Pyro handler may
   be active around the call except the parameter capture of pyro_lvm's drivers and
   :func:`pyro.poutine.block` (``poutine.scale`` around ``svi.step`` runs eagerly). A
   changed value selects another captured graph or captures a new one; a value that keeps
   changing (an annealed KL weight) makes the function run eagerly from then on.

Whenever a step refuses, the function runs eagerly, with one :class:`CompileWarning` that
names the reason: the compiled result equals the eager one or is not used. The graphs are
bounded (:data:`MAX_ENTRIES` per function, least recently used dropped) and so is the
number of compilations (:data:`MAX_CAPTURES`), so memory does not grow with the number of
batch shapes.

References
----------
PyTorch: ``torch.compile`` (TorchDynamo and TorchInductor, Ansel et al. 2024, "PyTorch 2",
ASPLOS) and ``torch.fx`` (Reed et al. 2022, "torch.fx", MLSys).
"""

from __future__ import annotations

import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import numpy as np
import pyro
import torch
import torch.utils._pytree as pytree
from pyro import poutine
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from torch import Tensor

from pyro_lvm import _registration
from pyro_lvm.infer.compile_graph import CaptureError, Replay, capture, close, trainable_leaves
from pyro_lvm.infer.compile_guards import StateGuard

__all__ = [
    "CompileWarning",
    "CompiledFunction",
    "compile_backend",
    "MAX_ENTRIES",
    "MAX_CAPTURES",
    "BACKENDS",
]

#: compiled graphs kept per function (a few batch shapes: full, last, evaluation)
MAX_ENTRIES = 6
#: captures per function; later new signatures run eagerly (each capture compiles)
MAX_CAPTURES = 12
#: recaptures caused by one changing Python value before the function runs eagerly
MAX_CHANGES = 2


#: what ``jit_compile=`` may name: ``True`` is the first
BACKENDS = ("inductor", "fx")


class CompileWarning(UserWarning):
    """The compiled path runs a call eagerly; the message says why."""


def compile_backend(jit_compile: bool | str | None) -> str | None:
    """The backend a ``jit_compile=`` value asks for: ``None`` (eager) for ``False`` or
    ``None``, ``"inductor"`` for ``True``, or the backend named (:data:`BACKENDS`, or any
    other :func:`torch.compile` backend); one-line error otherwise."""
    if jit_compile is None or jit_compile is False:
        return None
    if jit_compile is True:
        return BACKENDS[0]
    if isinstance(jit_compile, str) and (
        jit_compile in BACKENDS or jit_compile in torch.compiler.list_backends(exclude_tags=())
    ):
        return jit_compile
    raise ValueError(
        f"jit_compile must be True, False or a backend name ({', '.join(BACKENDS)}), got "
        f"{jit_compile!r}"
    )


class _Entry(NamedTuple):
    arguments: _ArgumentCheck
    guard: StateGuard
    replay: Replay
    getters: list[Callable[[], Tensor]]
    meta: list[tuple]  # (shape, strides, dtype, device, requires_grad) of each fetched input
    params: tuple[str, ...]  # Pyro params the eager call fetched, fetched again per call


def _meta(t: Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device, t.requires_grad


def _key_of(value: Any) -> Hashable:
    """A tensor's metadata; another value's type (its value is checked by the entry's
    argument check, so that a value that keeps changing is noticed)."""
    if isinstance(value, Tensor):
        return _meta(value)
    if isinstance(value, np.ndarray):
        return (np.ndarray, value.shape, value.dtype.str)
    return type(value)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, (bool, int, float, complex, str, bytes, type(None), np.generic)):
        return type(a) is type(b) and (a == b or (a != a and b != b))  # NaN equals NaN
    return a is b


class _ArgumentCheck:
    """The non-tensor arguments of a captured call (scalars and NumPy arrays by value,
    other objects by identity), compared on every call."""

    def __init__(self, flat: list):
        self.values = [
            (i, v.copy() if isinstance(v, np.ndarray) else v)
            for i, v in enumerate(flat)
            if not isinstance(v, Tensor)
        ]

    def __call__(self, flat: list) -> str | None:
        for i, value in self.values:
            if not _same_value(value, flat[i]):
                what = "a NumPy array" if isinstance(value, np.ndarray) else type(value).__name__
                return f"argument {i} ({what})"
        return None


class _Leaf:
    """The structure of one leaf in a :func:`_flatten` spec."""


_LEAF = _Leaf()


def _flatten(value: Any, leaves: list) -> Any:
    """Plain tuples, lists and dicts flattened into ``leaves``; their structure returned
    (a fraction of :func:`torch.utils._pytree.tree_flatten`'s cost per call), or
    ``None`` for any other container pytree knows (namedtuples, OrderedDicts...)."""
    kind = type(value)
    if kind is tuple or kind is list:
        parts = []
        for v in value:
            part = _flatten(v, leaves)
            if part is None:
                return None
            parts.append(part)
        return (kind, tuple(parts))
    if kind is dict:
        parts = []
        for k, v in value.items():
            part = _flatten(v, leaves)
            if part is None:
                return None
            parts.append((k, part))
        return (dict, tuple(parts))
    if not isinstance(value, Tensor) and not pytree.tree_is_leaf(value):
        return None
    leaves.append(value)
    return _LEAF


def _unflatten(spec: Any, it) -> Any:
    if spec is _LEAF:
        return next(it)
    kind, parts = spec
    if kind is dict:
        return {k: _unflatten(part, it) for k, part in parts}
    return kind(_unflatten(part, it) for part in parts)


def _signature(args: tuple, kwargs: dict) -> tuple[Hashable, list, Any]:
    """``(key, leaves, spec)`` of a call: the key holds the structure, every leaf's key
    (:func:`_key_of`) and the global state a graph depends on."""
    flat: list = []
    spec = _flatten((args, kwargs), flat)
    if spec is None:
        flat, tree = pytree.tree_flatten((args, kwargs))
        spec = ("pytree", tree)
        structure: Hashable = ("pytree", str(tree))
    else:
        structure = spec
    context = (
        torch.is_grad_enabled(),
        torch.get_default_dtype(),
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
        _registration.held(),
    )
    return (structure, tuple(_key_of(v) for v in flat), context), flat, spec


def _rebuild(flat: list, spec: Any, tensors: tuple) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a signature's leaves with its tensors replaced."""
    it = iter(tensors)
    values = [next(it) if isinstance(v, Tensor) else v for v in flat]
    if isinstance(spec, tuple) and spec[:1] == ("pytree",):
        return pytree.tree_unflatten(values, spec[1])
    return _unflatten(spec, iter(values))


def foreign_handler() -> str | None:
    """The first active Pyro handler a replay cannot honour, or ``None``: all but the
    parameter capture of pyro_lvm's drivers (``poutine.trace(param_only=True)``) and
    :func:`pyro.poutine.block`, which only see the Pyro params a replay fetches."""
    for messenger in _PYRO_STACK:
        kind = type(messenger)
        if kind is BlockMessenger or (kind is TraceMessenger and messenger.param_only):
            continue
        return kind.__name__
    return None


def _devices(tensors: list[Tensor]) -> list[int]:
    """CUDA devices whose random state the capture must leave untouched."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


class CompiledFunction:
    """``fn(*args, **kwargs) -> Tensor`` compiled once per signature, guarded, replayed.

    Parameters
    ----------
    fn : callable
        A function of tensors (in any nesting of tuples, lists and dicts) and other
        values returning one scalar tensor (a potential, a loss); it may use Pyro
        primitives and handlers inside.
    name : str
        What ``fn`` computes, for warnings.
    state : dict, optional
        ``{label: object}``: the objects whose reachable Python state the guards watch
        (the model, the guide, the loss object); by default ``{name: fn}``.
    backend : str
        ``"inductor"`` (compiled kernels), ``"fx"`` (the captured graphs replayed as they
        are: no compile time) or any other :func:`torch.compile` backend.

    Examples
    --------
    >>> loss = CompiledFunction(my_loss, name="my loss")        # doctest: +SKIP
    >>> loss(x).backward()                                       # doctest: +SKIP
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        *,
        name: str = "function",
        state: dict[str, Any] | None = None,
        backend: str = "inductor",
    ):
        self.fn, self.name, self.backend = fn, name, backend
        self.state = dict(state) if state is not None else {name: fn}
        self._cache: OrderedDict[Hashable, list[_Entry]] = OrderedDict()
        self._captures = 0
        self._changes: Counter[str] = Counter()
        self._eager: str | None = None  # why every call now runs eagerly
        self._warned: set[str] = set()
        self._fetched: dict[str, Tensor] = {}  # Pyro params fetched for the current replay
        #: seconds each capture took (eager call, tracing, compiling, verifying)
        self.compile_seconds: list[float] = []

    @property
    def num_compiled(self) -> int:
        """Graphs held now (at most :data:`MAX_ENTRIES`)."""
        return sum(len(entries) for entries in self._cache.values())

    @property
    def eager_reason(self) -> str | None:
        """Why every call runs eagerly now, or ``None`` while the function compiles."""
        return self._eager

    def __call__(self, *args, **kwargs) -> Tensor:
        if self._eager is not None:
            return self.fn(*args, **kwargs)
        handler = foreign_handler()
        if handler is not None:
            self._warn(f"an enclosing Pyro handler ({handler}) changes what it computes")
            return self.fn(*args, **kwargs)
        key, flat, spec = _signature(args, kwargs)
        changed = None
        entries = self._cache.get(key)
        if entries is not None:
            self._cache.move_to_end(key)
            for entry in entries:
                changed = entry.arguments(flat) or entry.guard.check()
                if changed is None:
                    out = self._replay(entry, flat)
                    if out is not None:
                        return out
                    changed = "the tensors it reads (shape, dtype or requires_grad)"
        return self._capture(key, flat, spec, args, kwargs, changed)

    # -- replay ---------------------------------------------------------------------------
    def _replay(self, entry: _Entry, flat: list) -> Tensor | None:
        fetched = self._fetched
        for name in entry.params:  # as in eager mode: enclosing handlers see them
            fetched[name] = pyro.param(name).unconstrained()
        lifted = [get() for get in entry.getters]
        for t, meta in zip(lifted, entry.meta):
            if _meta(t) != meta:
                return None
        tensors = [v for v in flat if isinstance(v, Tensor)]
        return entry.replay(tensors, lifted)

    # -- capture --------------------------------------------------------------------------
    def _capture(self, key, flat, spec, args, kwargs, changed: str | None) -> Tensor:
        if changed is not None:
            self._changes[changed] += 1
            if self._changes[changed] > MAX_CHANGES:
                return self._run_eagerly(
                    f"{changed} changed between calls (graphs are specialised to the "
                    "Python values they read)",
                    args,
                    kwargs,
                )
        if self._captures >= MAX_CAPTURES:
            return self._run_eagerly(
                f"it was compiled for {MAX_CAPTURES} input signatures already", args, kwargs
            )
        self._captures += 1
        start = time.perf_counter()
        # objects among the arguments: the same object (checked per call), its state guarded
        objects = {
            f"argument {i}": v
            for i, v in enumerate(flat)
            if not isinstance(v, (Tensor, np.ndarray, bool, int, float, complex, str, bytes))
            and v is not None
        }
        try:
            guard = StateGuard({**self.state, **objects})
        except ValueError as err:
            return self._run_eagerly(f"its Python state cannot be guarded: {err}", args, kwargs)
        tensors = [v for v in flat if isinstance(v, Tensor)]
        devices = _devices(tensors)
        rng = guard.rng_state()
        torch_rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])
        # the eager call: what the caller gets back, whatever follows
        with poutine.trace(param_only=True) as fetched:
            expected = self.fn(*args, **kwargs)
        why = self._check_call(expected, guard, rng)
        if why is not None:
            self._set_eager(why)
            return expected
        params = tuple(fetched.trace.nodes)
        try:
            entry = self._compile(guard, flat, spec, tensors, expected, params, torch_rng)
        except CaptureError as err:
            self._set_eager(str(err))
            return expected
        entries = self._cache.setdefault(key, [])
        entries.insert(0, entry)
        while self.num_compiled > MAX_ENTRIES:
            oldest = next(iter(self._cache))
            self._cache[oldest].pop()
            if not self._cache[oldest]:
                del self._cache[oldest]
        self.compile_seconds.append(time.perf_counter() - start)
        return expected

    def _check_call(self, expected: Any, guard: StateGuard, rng: list) -> str | None:
        if not isinstance(expected, Tensor) or expected.numel() != 1:
            shape = tuple(expected.shape) if isinstance(expected, Tensor) else None
            return f"it returned {type(expected).__name__} {shape or ''}, not a scalar tensor"
        if not expected.is_floating_point():
            return f"it returned a {expected.dtype} tensor, not a floating-point one"
        if guard.rng_state() != rng:
            return (
                "it draws from Python's or NumPy's random generator (random, numpy.random), "
                "which a replay would not; draw with torch instead"
            )
        changed = guard.check()
        if changed is not None:
            return f"calling it changes {changed}, which a replay would not"
        return None

    def _compile(self, guard, flat, spec, tensors, expected, params, torch_rng) -> _Entry:
        leaves = []
        if expected.requires_grad:
            leaves = trainable_leaves(expected, tensors)
        store = pyro.get_param_store()
        store_names = {id(p): n for n, p in store.named_parameters()}
        fetched = self._fetched

        def lift(t: Tensor) -> Callable[[], Tensor] | None:
            name = store_names.get(id(t))
            if name is not None and name in params:
                return lambda: fetched[name]
            if name is not None:  # read without a pyro.param call: fetched the same way
                return lambda: store.get_param(name).unconstrained()
            return guard.getter(t)

        def call(*ts):
            call_args, call_kwargs = _rebuild(flat, spec, ts)
            return self.fn(*call_args, **call_kwargs)

        cpu_rng, cuda_rng = torch_rng
        devices = _devices(tensors)
        with torch.random.fork_rng(devices=devices):
            _set_rng(cpu_rng, cuda_rng, devices)
            replay, getters = capture(call, tensors, leaves, lift, self.backend, expected)
            for name in params:
                fetched[name] = pyro.param(name).unconstrained()
            lifted = [get() for get in getters]
            _set_rng(cpu_rng, cuda_rng, devices)
            try:
                got = replay(tensors, lifted)
            except Exception as err:  # noqa: BLE001 - a compiler failure: run eagerly
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise CaptureError(
                    f"compiling failed ({type(err).__name__}: {first[:160]})"
                ) from None
        self._verify(got, expected, tensors, leaves)
        return _Entry(
            _ArgumentCheck(flat), guard, replay, getters, [_meta(t) for t in lifted], params
        )

    def _verify(self, got: Tensor, expected: Tensor, tensors, leaves) -> None:
        if not close(got, expected):
            raise CaptureError(
                "its compiled value disagrees with the eager one "
                f"({float(got.detach()):.8g} vs {float(expected.detach()):.8g})"
            )
        targets = [t for t in tensors if t.requires_grad] + list(leaves)
        if not expected.requires_grad or not targets:
            return
        eager = torch.autograd.grad(expected, targets, retain_graph=True, allow_unused=True)
        compiled = torch.autograd.grad(got, targets, retain_graph=True, allow_unused=True)
        for i, (a, b) in enumerate(zip(compiled, eager)):
            if not close(a, b):
                raise CaptureError(f"its compiled gradient {i} disagrees with the eager one")

    # -- eager fallback -------------------------------------------------------------------
    def _set_eager(self, why: str) -> None:
        self._eager = why
        self._cache.clear()
        self._warn(why)

    def _run_eagerly(self, why: str, args, kwargs) -> Tensor:
        self._set_eager(why)
        return self.fn(*args, **kwargs)

    def _warn(self, why: str) -> None:
        if why in self._warned:
            return
        self._warned.add(why)
        warnings.warn(
            f"{self.name} runs eagerly: {why}; pass jit_compile=False to silence this",
            CompileWarning,
            stacklevel=4,
        )


def _set_rng(cpu: Tensor, cuda: list[Tensor], devices: list[int]) -> None:
    torch.set_rng_state(cpu)
    for state, device in zip(cuda, devices):
        torch.cuda.set_rng_state(state, device)
