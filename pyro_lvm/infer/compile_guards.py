r"""Guards of a compiled graph: the Python state its capture read, checked before a replay.

A graph captured from a Pyro model (:mod:`pyro_lvm.infer.compile`) holds only tensor
operations: every Python value the model read on the way (``self.beta``, a module's
``training`` flag, a global, a closure cell, a NumPy array) is baked into it. A replay is
exact only while those values are unchanged, so :class:`StateGuard` snapshots, when a
graph is captured, the Python state *reachable* from the compiled function and
:meth:`StateGuard.check` compares it before each replay (generated code, a few
microseconds per value):

* the objects the function is bound to or closes over (``functools.partial`` arguments, a
  bound method's ``self``, closure cells and default arguments) and, recursively, their
  attributes: ``nn.Module`` submodules, their ``training`` flags, hook tables and
  attributes; attributes of other objects; elements of lists, tuples, dicts and sets;
* for functions defined outside torch, Pyro, NumPy, pyro_lvm and the standard library
  (the user's code), the module globals their code names (``BETA`` in ``beta = BETA``)
  and the class attributes of user classes;
* scalars by value, NumPy arrays by content, types and functions by identity, tensors by
  *path*: a tensor reachable this way is a graph input read at its path on every call
  (an optimizer's in-place update, a buffer updated in place or replaced: all seen), and
  its dtype, shape, device and ``requires_grad`` are checked.

Random generators (:class:`random.Random`, NumPy's, :class:`torch.Generator`) are not
compared call by call: :meth:`StateGuard.rng_state` (and :meth:`StateGuard.check` right
after a call) let the compiler refuse a function whose call draws from them or changes any
other reachable value, which a replay would not do.

What a guard cannot see is state reached by other means (an attribute name computed at
run time, a module the code imports inside a function, a C extension's internals): the
documented limit of the compiled path (``docs/benchmarks.md``).
"""

from __future__ import annotations

import enum
import functools
import random
import sys
import sysconfig
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["StateGuard", "is_user_code", "is_user_file"]

#: the most objects one guard walks (beyond: the compiler refuses, naming the limit)
MAX_OBJECTS = 20_000
#: the largest NumPy array compared by content (elements)
MAX_ARRAY = 1_000_000

_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_IDENTITY = (type, types.ModuleType, types.BuiltinFunctionType, types.MethodWrapperType)
_RNGS = (random.Random, np.random.Generator, np.random.RandomState, torch.Generator)
# nn.Module internals: hooks are checked for emptiness, parameters/buffers/submodules walked
_MODULE_SKIP = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_forward_hooks_always_called",
    }
)
_MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    here = Path(__file__).resolve().parents[1]  # the pyro_lvm package
    return tuple(sorted({str(Path(p).resolve()) for p in paths} | {str(here)}))


def is_user_file(filename: str | None) -> bool:
    """Whether code in ``filename`` is the user's: outside the standard library, installed
    packages and pyro_lvm (an interactive session's code counts as the user's)."""
    if not filename or filename.startswith("<frozen"):
        return False
    if filename.startswith("<"):
        return True
    return not str(Path(filename).resolve()).startswith(_library_roots())


def is_user_code(fn: Any) -> bool:
    """Whether ``fn`` (a function, class or module) is defined in the user's code: code
    whose globals a guard must watch."""
    code = getattr(fn, "__code__", None)
    if code is not None:
        return is_user_file(code.co_filename)
    if isinstance(fn, types.ModuleType):
        return is_user_file(getattr(fn, "__file__", None))
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    return is_user_file(getattr(module, "__file__", None))


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


class _Walk:
    """One traversal: the checks as the statements of a generated function (each object
    bound to a local once), and the tensors by path from the roots."""

    def __init__(self):
        self.consts: list[Any] = []  # values the generated code refers to
        self.lines: list[str] = []  # statements: bindings and checks
        self.labels: list[str] = []  # what each check watches, for messages
        self.tensors: dict[int, str] = {}  # id(tensor) -> path expression from the roots
        self.seen: set[int] = set()
        self.rngs: list[Any] = []  # reachable random generators
        self.count = 0

    def const(self, value: Any) -> str:
        self.consts.append(value)
        return f"K[{len(self.consts) - 1}]"

    def bind(self, expr: str) -> str:
        name = f"v{len(self.lines)}"
        self.lines.append(f"{name} = {expr}")
        return name

    def fail_if(self, condition: str, label: str) -> None:
        self.lines.append(f"if {condition}: return {len(self.labels)}")
        self.labels.append(label)

    def visit(self, value: Any, path: str, expr: str, label: str) -> None:
        """Watch ``value``, found at ``path`` from the roots and at ``expr`` in the
        generated code."""
        self.count += 1
        if self.count > MAX_OBJECTS:
            raise _TooMuchState(f"more than {MAX_OBJECTS} reachable objects")
        if isinstance(value, Tensor):
            self.tensors.setdefault(id(value), path)
            return
        if isinstance(value, _SCALARS) or isinstance(value, enum.Enum):
            v = self.bind(expr)
            kind, const = self.const(type(value)), self.const(value)
            self.fail_if(f"type({v}) is not {kind} or {v} != {const}", label)
            return
        if isinstance(value, (np.generic, np.ndarray)):
            if isinstance(value, np.ndarray) and value.size > MAX_ARRAY:
                raise _TooMuchState(f"{label} is a NumPy array of {value.size} elements")
            copy = self.const(np.array(value, copy=True))
            self.fail_if(f"not K_array_equal({expr}, {copy})", label)
            return
        if isinstance(value, _RNGS) and id(value) not in self.seen:
            self.seen.add(id(value))
            self.rngs.append(value)  # its state is compared around a capture's call
        if isinstance(value, (*_RNGS, *_IDENTITY)) or id(value) in self.seen:
            self.fail_if(f"{expr} is not {self.const(value)}", label)
            return
        self.seen.add(id(value))
        v = self.bind(expr)
        self.fail_if(f"type({v}) is not {self.const(type(value))}", label)
        if isinstance(value, (tuple, list)):
            self.fail_if(f"len({v}) != {len(value)}", label)
            for i, item in enumerate(value):
                self.visit(item, f"{path}[{i}]", f"{v}[{i}]", f"{label}[{i}]")
        elif isinstance(value, (set, frozenset)):
            self.fail_if(f"{v} != {self.const(set(value))}", label)
        elif isinstance(value, dict):
            self._dict(value, path, v, label)
        elif isinstance(value, nn.Module):
            self._module(value, path, v, label)
        elif isinstance(value, functools.partial):
            for part in ("func", "args", "keywords"):
                self.visit(getattr(value, part), f"{path}.{part}", f"{v}.{part}", label)
        elif isinstance(value, types.MethodType):
            owner = type(value.__self__).__name__
            self.visit(value.__self__, f"{path}.__self__", f"{v}.__self__", owner)
            self.visit(value.__func__, f"{path}.__func__", f"{v}.__func__", label)
        elif isinstance(value, types.FunctionType):
            self.fail_if(f"{v} is not {self.const(value)}", label)
            self._function(value, path, v, label)
        else:
            self._object(value, path, v, label)

    def _dict(self, value: dict, path: str, v: str, label: str, skip=()) -> None:
        self.fail_if(f"{v}.keys() != {self.const(set(value))}", f"{label}'s keys")
        for k, item in value.items():
            if k not in skip:
                key = repr(k) if isinstance(k, str) else self.const(k)
                name = f"{label}.{k}" if isinstance(k, str) else f"{label}[{k!r}]"
                self.visit(item, f"{path}[{key}]", f"{v}[{key}]", name)

    def _module(self, module: nn.Module, path: str, v: str, label: str) -> None:
        d = self.bind(f"{v}.__dict__")
        self.fail_if(f"{d}.keys() != {self.const(set(module.__dict__))}", f"{label}'s attributes")
        if any(module.__dict__.get(hooks) for hooks in _MODULE_HOOKS):
            raise _TooMuchState(f"{label} has forward hooks, which a replay would not call")
        hooks = " or ".join(f"{d}.get({h!r})" for h in _MODULE_HOOKS)
        self.fail_if(f"{d}['training'] is not {module.training} or {hooks}", f"{label}.training")
        for kind in ("_parameters", "_buffers"):
            table = module.__dict__[kind]
            self.fail_if(f"{d}[{kind!r}].keys() != {self.const(set(table))}", f"{label}.{kind}")
            for name, t in table.items():
                if t is not None:
                    self.tensors.setdefault(id(t), f"{path}.__dict__[{kind!r}][{name!r}]")
        children = self.bind(f"{d}['_modules']")
        self._dict(module.__dict__["_modules"], f"{path}.__dict__['_modules']", children, label)
        skip = _MODULE_SKIP | set(_MODULE_HOOKS) | {"training"}
        attrs = {k: x for k, x in module.__dict__.items() if k not in skip}
        for name, item in attrs.items():
            self.visit(item, f"{path}.__dict__[{name!r}]", f"{d}[{name!r}]", f"{label}.{name}")
        self._class(type(module))

    def _object(self, value: Any, path: str, v: str, label: str) -> None:
        attrs = getattr(value, "__dict__", None)
        if isinstance(attrs, dict):
            d = self.bind(f"{v}.__dict__")
            self._dict(attrs, f"{path}.__dict__", d, label)
        for cls in type(value).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if isinstance(name, str) and hasattr(value, name) and name != "__weakref__":
                    item = getattr(value, name)
                    self.visit(item, f"{path}.{name}", f"{v}.{name}", f"{label}.{name}")
        self._class(type(value))

    def _class(self, cls: type) -> None:
        """Class attributes and method globals of the user's classes."""
        for klass in cls.__mro__:
            if klass is object or not is_user_code(klass) or id(klass) in self.seen:
                continue
            self.seen.add(id(klass))
            for name, item in vars(klass).items():
                if name.startswith("__"):
                    continue
                label = f"{klass.__name__}.{name}"
                path = f"{self.const(klass)}.__dict__[{name!r}]"
                if isinstance(item, (staticmethod, classmethod)):
                    item, path = item.__func__, f"{path}.__func__"
                if isinstance(item, property):
                    for part in ("fget", "fset"):
                        fn = getattr(item, part)
                        if isinstance(fn, types.FunctionType):
                            self._function(fn, f"{path}.{part}", f"{path}.{part}", label)
                elif isinstance(item, types.FunctionType):
                    self._function(item, path, path, label)
                else:
                    self.visit(item, path, path, label)

    def _function(self, fn: types.FunctionType, path: str, v: str, label: str) -> None:
        if id(fn.__code__) in self.seen:
            return
        self.seen.add(id(fn.__code__))
        for i, cell in enumerate(fn.__closure__ or ()):
            try:
                item = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            step = f".__closure__[{i}].cell_contents"
            name = fn.__code__.co_freevars[i]
            self.visit(item, f"{path}{step}", f"{v}{step}", f"{label}:{name}")
        for part in ("__defaults__", "__kwdefaults__"):
            if getattr(fn, part):
                self.visit(getattr(fn, part), f"{path}.{part}", f"{v}.{part}", label)
        if not is_user_code(fn):
            return
        scope = fn.__globals__
        names = _code_names(fn.__code__)
        for name in sorted(names & scope.keys()):
            item = scope[name]
            at = f"{self.const(scope)}[{name!r}]"
            if isinstance(item, types.ModuleType):
                if is_user_code(item):  # `config.BETA`: the user's module's named globals
                    for attr in sorted(names & vars(item).keys()):
                        step = f"{at}.__dict__[{attr!r}]"
                        self.visit(vars(item)[attr], step, step, f"{name}.{attr}")
                continue
            self.visit(item, at, at, name)


class _TooMuchState(Exception):
    """The reachable state cannot be guarded (too large, or hooks a replay would skip)."""


class StateGuard:
    """The Python state reachable from ``roots``, snapshotted now and compared later.

    Parameters
    ----------
    roots : dict
        ``{label: object}``: the function's own parts (see the module docstring).

    Raises
    ------
    ValueError
        One line naming what cannot be guarded (hooks a replay would skip, too many
        objects, a huge NumPy array).
    """

    def __init__(self, roots: dict[str, Any]):
        walk = _Walk()
        try:
            for i, (label, root) in enumerate(roots.items()):
                if isinstance(root, nn.Module):
                    label = type(root).__name__
                walk.visit(root, f"R[{i}]", f"R[{i}]", label)
        except _TooMuchState as err:
            raise ValueError(str(err)) from None
        self.roots = tuple(roots.values())
        self.labels = walk.labels
        self._rngs = walk.rngs
        self.tensor_paths = walk.tensors
        body = "".join(f"    {line}\n" for line in walk.lines)
        source = f"def check(R, K, K_array_equal):\n{body}    return -1\n"
        scope: dict[str, Any] = {}
        exec(compile(source, "<pyro_lvm guard>", "exec"), scope)  # noqa: S102 - our own code
        self._check = scope["check"]
        self._consts = walk.consts

    def check(self) -> str | None:
        """``None`` if every watched value is unchanged, else the first changed one."""
        try:
            failed = self._check(self.roots, self._consts, np.array_equal)
        except Exception:  # noqa: BLE001 - a path that no longer resolves: changed
            return "the function's reachable state (a path no longer resolves)"
        return None if failed < 0 else self.labels[failed]

    def rng_state(self) -> list:
        """The states of the random generators a replay could not reproduce: Python's,
        NumPy's global one and the generators reachable from the roots (torch's global
        draws are graph operations)."""
        states = [random.getstate(), _numpy_state(np.random.get_state())]
        for rng in self._rngs:
            if isinstance(rng, torch.Generator):
                states.append(bytes(rng.get_state().numpy()))
            elif isinstance(rng, np.random.Generator):
                states.append(repr(rng.bit_generator.state))
            elif isinstance(rng, np.random.RandomState):
                states.append(_numpy_state(rng.get_state()))
            else:
                states.append(rng.getstate())
        return states

    def getter(self, tensor: Tensor) -> Callable[[], Tensor] | None:
        """A function returning the tensor now at ``tensor``'s path, or ``None`` when
        ``tensor`` is not reachable."""
        expr = self.tensor_paths.get(id(tensor))
        if expr is None:
            return None
        fn = eval(f"lambda R, K: {expr}")  # noqa: S307 - our own path expression
        roots, consts = self.roots, self._consts
        return lambda: fn(roots, consts)


def _numpy_state(state: tuple) -> tuple:
    kind, keys, pos, has_gauss, cached = state
    return kind, keys.tobytes(), pos, has_gauss, cached
