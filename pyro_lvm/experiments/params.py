"""The Pyro params of a run that live outside its modules, as plain checkpoint data.

A model may keep trained values in Pyro's global param store (``pyro.param("w",
init, constraint=...)``, or ``pyro.module`` of a network that is not among the run's
modules) rather than on an ``nn.Module``; :class:`~pyro_lvm.infer.ModuleSVI` and
:class:`~pyro_lvm.infer.LAE` train them. The module ``state_dict`` does not hold them, so
a checkpoint records them beside it: :func:`param_store_state` saves every store entry
that is not a tensor of the run's modules, :func:`load_param_store_state` puts them back,
bit for bit, where the model's next ``pyro.param`` call finds them.

Checkpoints load with ``weights_only=True``, so a constraint is saved as plain data: the
name of one of Pyro's or torch's constraint objects (``"positive"``), or the class
(from ``torch.distributions`` or ``pyro.distributions`` only) and its attributes
(``interval`` bounds). Loading never imports a module or builds another class.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from pyro import get_param_store
from pyro.distributions import constraints
from torch import nn
from torch.distributions import transform_to
from torch.distributions.constraints import Constraint

__all__ = ["load_param_store_state", "param_store_state"]

_TRUSTED = ("torch.distributions.", "pyro.distributions.")


def param_store_state(modules: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: {"value": unconstrained tensor, "constraint": plain data}}`` of every
    Pyro param store entry that is not a parameter or buffer of ``modules``."""
    own = {id(t) for t in (*modules.parameters(), *modules.buffers())}
    state = get_param_store().get_state()
    return {
        name: {
            "value": value.detach().clone(),
            "constraint": _encode(state["constraints"][name], name),
        }
        for name, value in state["params"].items()
        if id(value) not in own
    }


def load_param_store_state(saved: dict[str, dict[str, Any]], device: torch.device) -> None:
    """Put the params of :func:`param_store_state` into Pyro's param store: in place where
    an entry of that name and shape exists (an optimizer holding it keeps it), else as a
    new entry with the saved constraint."""
    store = get_param_store()
    for name, entry in saved.items():
        value = entry["value"].to(device)
        constraint = _decode(entry["constraint"])
        if name in store:
            state = store.get_state()
            current = state["params"][name]
            if current.shape == value.shape and type(state["constraints"][name]) is type(
                constraint
            ):
                with torch.no_grad():
                    current.copy_(value)
                continue
            del store[name]
        store.setdefault(name, transform_to(constraint)(value).detach(), constraint)
        with torch.no_grad():  # the exact unconstrained value, not inv(transform(value))
            store.get_state()["params"][name].copy_(value)


def _encode(constraint: Constraint, param: str) -> dict[str, Any]:
    for name in dir(constraints):
        if getattr(constraints, name) is constraint:
            return {"name": name}
    cls = type(constraint)
    if not cls.__module__.startswith(_TRUSTED):
        raise ValueError(
            f"pyro.param {param!r} has the constraint {cls.__qualname__} from "
            f"{cls.__module__}, which a checkpoint cannot record; use one of "
            "pyro.distributions.constraints"
        )
    attrs = {}
    for key, value in vars(constraint).items():
        if isinstance(value, Constraint):
            value = {"constraint": _encode(value, param)}
        elif not isinstance(value, (bool, int, float, str, type(None), torch.Tensor)):
            raise ValueError(
                f"pyro.param {param!r}: its constraint {cls.__qualname__} holds a "
                f"{type(value).__name__} ({key}), which a checkpoint cannot record"
            )
        attrs[key] = value
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "attrs": attrs}


def _decode(data: dict[str, Any]) -> Constraint:
    if "name" in data:
        found = getattr(constraints, data["name"], None)
        if not isinstance(found, Constraint):
            raise ValueError(f"unknown constraint {data['name']!r} in a checkpoint")
        return found
    module, _, qualname = data["class"].partition(":")
    cls = getattr(sys.modules.get(module) if module.startswith(_TRUSTED) else None, qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, Constraint)):
        raise ValueError(f"unknown constraint class {data['class']!r} in a checkpoint")
    obj = cls.__new__(cls)
    for key, value in data["attrs"].items():
        if isinstance(value, dict) and "constraint" in value:
            value = _decode(value["constraint"])
        setattr(obj, key, value)
    return obj
