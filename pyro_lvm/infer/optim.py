r"""One optimizer interface for the drivers: a :mod:`torch.optim` optimizer or a
:class:`pyro.optim.PyroOptim`, over explicit parameters *and* the model's Pyro params.

Pyro finds what to train by tracing: every :func:`pyro.param` (and so every
:func:`pyro.module`) call in the model or guide is a ``"param"`` site, and
:class:`pyro.infer.SVI` steps the unconstrained tensors it saw. The drivers of
pyro_lvm (:class:`~pyro_lvm.infer.svi.ModuleSVI`, :class:`~pyro_lvm.infer.lae.LAE`) take
a torch optimizer over module parameters instead. :class:`ParamOptimizer` accepts both:

- a **torch optimizer** steps its own parameter groups, plus every traced Pyro param it
  does not hold yet that received a gradient; those join as a new parameter group with the
  optimizer's defaults (so a ``pyro.param`` in a user's model is trained with the same
  learning rate as the modules);
- a **PyroOptim** steps exactly the traced Pyro params (one torch optimizer per tensor,
  keyed by param store name, as :class:`pyro.infer.SVI` does) plus any explicit extra
  parameters, which are registered in the param store under ``extra_name$$$...`` first.

Tensors in ``exclude`` (the Markov chain's state in :class:`~pyro_lvm.infer.lae.LAE`)
are never stepped. Which to use: a torch optimizer when the trained parameters are module
parameters (checkpoints are ``state_dict``\ s; resume is exact); a PyroOptim to reuse Pyro
code (per-parameter learning rates via a callable, :class:`pyro.optim.ClippedAdam`,
schedulers) or a model written around ``pyro.param``.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.optim import PyroOptim
from pyro.params import param_with_module_name
from torch import Tensor

from pyro_lvm._registration import holding

__all__ = ["ParamOptimizer"]


class ParamOptimizer:
    """A torch or Pyro optimizer stepping explicit parameters and traced Pyro params.

    Parameters
    ----------
    optim : torch.optim.Optimizer or pyro.optim.PyroOptim
        The optimizer.
    exclude : iterable of Tensor
        Tensors never to step (removed from a torch optimizer's groups here).
    extra : dict of str to Tensor, optional
        Named parameters to train besides the traced ones with a PyroOptim (the LAE
        encoder), registered in the param store as ``extra_name$$$name``.
    extra_name : str
        Param store prefix of ``extra``.
    """

    def __init__(
        self,
        optim: torch.optim.Optimizer | PyroOptim,
        exclude: Iterable[Tensor] = (),
        extra: dict[str, Tensor] | None = None,
        extra_name: str = "encoder",
    ):
        if not isinstance(optim, (torch.optim.Optimizer, PyroOptim)):
            raise TypeError(
                f"optim must be a torch.optim.Optimizer or a pyro.optim.PyroOptim, got "
                f"{type(optim).__name__}; e.g. torch.optim.Adam(params) or "
                "pyro.optim.Adam({'lr': 1e-3})"
            )
        self.optim = optim
        self.is_pyro = isinstance(optim, PyroOptim)
        self._exclude_tensors: list[Tensor] = []
        self._exclude: set[int] = set()
        self._extra = dict(extra or {})
        self._extra_name = extra_name
        self._pending_state: dict | None = None
        self.exclude(exclude)

    def exclude(self, tensors: Iterable[Tensor]) -> None:
        """Never step ``tensors`` (removed from a torch optimizer's groups and state)."""
        new = [p for p in tensors if id(p) not in self._exclude]
        if not new:
            return
        self._exclude_tensors += new
        self._exclude |= {id(p) for p in new}
        if not self.is_pyro:
            for group in self.optim.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in self._exclude]
            for p in list(self.optim.state):
                if id(p) in self._exclude:
                    self.optim.state.pop(p)

    def _held(self) -> set[int]:
        return {id(p) for group in self.optim.param_groups for p in group["params"]}

    def torch_params(self) -> list[Tensor]:
        """The parameters a torch optimizer holds (empty for a PyroOptim)."""
        if self.is_pyro:
            return []
        return [p for group in self.optim.param_groups for p in group["params"]]

    @contextmanager
    def capture(self, declare_held: bool = True):
        """Trace the Pyro params used inside the block; yields a set filled on exit.

        Their gradients are cleared on exit, so call ``backward`` after the block: a
        param restored from a checkpoint (or used elsewhere) may carry a stale ``.grad``.
        Param sites inside :func:`pyro.poutine.block` are hidden unless the block lets
        ``"param"`` messages through. ``declare_held`` lets the ready models skip
        re-registering parameters this torch optimizer holds (:mod:`pyro_lvm._registration`);
        a JIT-compiled ELBO needs them registered, as its inputs.
        """
        found: set[Tensor] = set()
        # modules whose parameters this torch optimizer holds (or excludes) need not
        # re-register them with the param store on every call (pyro_lvm._registration)
        declared = []
        if declare_held and not self.is_pyro:
            declared = [*self.torch_params(), *self._exclude_tensors]
        with holding(declared), poutine.trace(param_only=True) as tracer:
            yield found
        for site in tracer.trace.nodes.values():
            p = site["value"].unconstrained()
            if id(p) not in self._exclude:
                found.add(p)
                p.grad = None

    def zero_grad(self) -> None:
        """Clear the gradients of the optimizer's own parameters (a torch optimizer's
        groups, a PyroOptim's ``extra``); traced params are cleared by :meth:`capture`."""
        if not self.is_pyro:
            self.optim.zero_grad(set_to_none=True)
        else:
            for p in self._extra.values():
                p.grad = None

    def _register_extra(self) -> list[Tensor]:
        store = pyro.get_param_store()
        out = []
        for name, p in self._extra.items():
            if id(p) in self._exclude or not p.requires_grad:
                continue
            if store.param_name(p) is None:
                pyro.param(param_with_module_name(self._extra_name, name), p)
            out.append(p)
        return out

    def params(self, traced: set[Tensor]) -> list[Tensor]:
        """Every tensor the next :meth:`step` updates: with a torch optimizer its groups,
        after admitting the ``traced`` Pyro params it does not hold yet (see the module
        docstring); with a PyroOptim the traced params and the ``extra`` ones."""
        if self.is_pyro:
            # by param store name: an order every process agrees on (data parallel)
            store = pyro.get_param_store()
            ordered = sorted(traced, key=lambda p: store.param_name(p) or "")
            return ordered + [p for p in self._register_extra() if p not in traced]
        self._admit(traced)
        return self.torch_params()

    def _admit(self, traced: set[Tensor]) -> None:
        held = self._held()
        new = [p for p in traced if id(p) not in held and p.grad is not None]
        if not new:
            return
        # deterministic order (the trace is a set): by param store name
        store = pyro.get_param_store()
        new.sort(key=lambda p: store.param_name(p) or "")
        self.optim.add_param_group({"params": new})
        pending = self._pending_state
        if pending is not None and len(pending["param_groups"]) == len(self.optim.param_groups):
            self.optim.load_state_dict(pending)
            self._pending_state = None

    def step(self, traced: set[Tensor], clip_norm: float | None = None) -> None:
        """One optimizer step after ``backward``: the optimizer's own parameters and the
        ``traced`` Pyro params (see the module docstring), the global gradient norm
        clipped to ``clip_norm`` first if given."""
        params = self.params(traced)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip_norm)
        if self.is_pyro:
            self.optim([p for p in params if p.grad is not None])
        else:
            self.optim.step()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (a PyroOptim's ``get_state()``, keyed by param name)."""
        if self.is_pyro:
            return {"pyro_optim": self.optim.get_state()}
        return self.optim.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Torch state with parameter groups of traced Pyro
        params that this optimizer has not seen yet is applied once the next step has
        found them."""
        if self.is_pyro:
            if "pyro_optim" not in state:
                raise ValueError(
                    "this optimizer state comes from a torch optimizer; resume with the "
                    "same kind of optimizer (a pyro.optim.PyroOptim was given)"
                )
            self.optim.set_state(state["pyro_optim"])
            return
        if "pyro_optim" in state:
            raise ValueError(
                "this optimizer state comes from a pyro.optim.PyroOptim; resume with the "
                "same kind of optimizer (a torch optimizer was given)"
            )
        if len(state["param_groups"]) > len(self.optim.param_groups):
            self._pending_state = state
            return
        self.optim.load_state_dict(state)
