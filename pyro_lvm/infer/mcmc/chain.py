r"""The ALD chain state: which encoder parameters it is, and how it gives the latents.

ALD runs MALA on encoder parameters :math:`\phi` (by default the weight :math:`\Phi` of
the final ``nn.Linear``) and reads the latents off the encoder. Per batch,
:func:`chain_map` returns a :class:`ChainMap`: the flat chain coordinates at the
encoder's current weights and a closure from coordinates to the local sites' values.

**Features, for any encoder.** A forward hook on the final ``nn.Linear`` captures its
input :math:`G` (the trunk features) during one encoder call per batch. When every site
value the encoder returns is the head's output or a column slice of it (``y[:, a:b]``,
checked by storage identity and once per batch shape by value), a proposal costs one
matmul :math:`G\Phi^\top + b`; otherwise the encoder is re-run with the proposed
parameters (``torch.func.functional_call``), after checking once per batch shape that its
output is affine in them (:func:`check_affine`). An ``nn.Sequential`` encoder ending in the
head, with no forward hooks (:func:`sequential_trunk`), is ``head(trunk(x))`` by
construction: once a batch shape has been checked, later batches of that shape run the
trunk alone (no head matmul, no hook).

**Preconditioning** (``precondition=`` :math:`\lambda`, any encoder with the default chain
state): per batch :math:`\Phi = \Phi_0 + U A` with
:math:`A = (G G^\top + \lambda\bar e I)^{-1} G`, and MALA runs on :math:`U`, so the latents
move as per-datapoint Langevin in latent space whatever the conditioning of :math:`G`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

__all__ = [
    "RankConditionWarning",
    "ChainMap",
    "final_linear",
    "run_capturing",
    "sequential_trunk",
    "head_slices",
    "chain_map",
    "check_affine",
    "solve_head_weight",
]


class RankConditionWarning(UserWarning):
    """The encoder has fewer features than the batch has rows: ALD samples then collapse."""


class ChainMap(NamedTuple):
    """The chain on one batch.

    Attributes
    ----------
    start : Tensor
        Flat chain coordinates at the encoder's current weights.
    params_of : callable
        Coordinates -> values of the chain parameters (to write back into the encoder).
    local_values : callable
        Coordinates -> ``{site: unconstrained value}``.
    features : Tensor or None
        The final layer's input :math:`G` (captured), when the default chain state is used.
    slices : dict or None
        ``{site: (a, b)}`` when every site is a column slice of the head's output (the
        one-matmul path), else ``None``.
    """

    start: Tensor
    params_of: Callable[[Tensor], list[Tensor]]
    local_values: Callable[[Tensor], dict[str, Tensor]]
    features: Tensor | None
    slices: dict[str, tuple[int, int]] | None


def final_linear(encoder: nn.Module) -> tuple[str, nn.Linear] | None:
    """The encoder's final ``nn.Linear`` (its last module if a ``Sequential``, else the
    last registered ``nn.Linear`` submodule), with its qualified name."""
    if isinstance(encoder, nn.Linear):
        return "", encoder
    if isinstance(encoder, nn.Sequential) and len(encoder):
        last = encoder[-1]
        return (str(len(encoder) - 1), last) if isinstance(last, nn.Linear) else None
    found = None
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


def run_capturing(
    encoder: nn.Module, head: nn.Linear, x: Tensor
) -> tuple[Any, Tensor, Tensor, int]:
    """``encoder(x)`` with the head's input and output captured: ``(out, G, y, calls)``."""
    captured: list[tuple[Tensor, Tensor]] = []

    def hook(module, inputs, output):
        captured.append((inputs[0], output))

    handle = head.register_forward_hook(hook)
    try:
        out = encoder(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(
            f"the encoder never called its final nn.Linear {head}; name the chain parameters "
            "with params=[...]"
        )
    features, y = captured[-1]
    return out, features, y, len(captured)


def sequential_trunk(encoder: nn.Module, head: nn.Linear) -> list[nn.Module] | None:
    """The modules before ``head`` when ``encoder(x)`` is exactly ``head(trunk(x))``: an
    ``nn.Sequential`` (or a subclass keeping its ``forward`` and call) ending in ``head``
    (used once), with no forward hooks on it, on the head or registered globally; else
    ``None``."""
    kind = type(encoder)
    if not isinstance(encoder, nn.Sequential) or kind.forward is not nn.Sequential.forward:
        return None
    if kind.__call__ is not nn.Module.__call__ or kind._call_impl is not nn.Module._call_impl:
        return None
    if (
        type(head).__call__ is not nn.Module.__call__
        or type(head)._call_impl is not nn.Module._call_impl
    ):
        return None
    if not len(encoder) or encoder[-1] is not head:
        return None
    trunk = list(encoder)[:-1]
    if any(m is head for m in trunk):
        return None
    hooked = (encoder._forward_hooks, encoder._forward_pre_hooks)
    hooked += (head._forward_hooks, head._forward_pre_hooks)
    hooked += (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks)
    return None if any(hooked) else trunk


def head_slices(values: dict[str, Tensor], y: Tensor) -> dict[str, tuple[int, int]] | None:
    """``{site: (a, b)}`` if each value is ``y`` or ``y[..., a:b]`` (same storage), else None."""
    if y.dim() != 2 or not y.is_contiguous():
        return None
    out = {}
    for name, v in values.items():
        if v is y:
            out[name] = (0, y.shape[1])
            continue
        same = v.dim() == 2 and v.shape[0] == y.shape[0] and v.stride() == y.stride()
        if not same or v.untyped_storage().data_ptr() != y.untyped_storage().data_ptr():
            return None
        a = v.storage_offset() - y.storage_offset()
        if not (0 <= a and a + v.shape[1] <= y.shape[1]):
            return None
        out[name] = (a, a + v.shape[1])
    return out


def _preconditioner(features: Tensor, damping: float) -> Tensor:
    r""":math:`A = (G G^\top + \lambda \bar e I)^{-1} G`."""
    gram = features @ features.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + damping * gram.diagonal().mean() * eye, features)


def _check_rank(num_features: int, batch_size: int, warned: list[bool]) -> None:
    if num_features < batch_size and not warned[0]:
        warned[0] = True
        warnings.warn(
            f"the encoder has {num_features} features for a batch of {batch_size}: ALD "
            "samples collapse when the feature width is below the batch size; widen the "
            "encoder's last hidden layer or use smaller batches",
            RankConditionWarning,
            stacklevel=4,
        )


def chain_map(
    encoder: nn.Module,
    x: Tensor,
    chain_params: Sequence[nn.Parameter],
    param_names: Sequence[str],
    head: nn.Linear | None,
    as_dict: Callable[[Any], dict[str, Tensor]],
    *,
    keep_graph: bool = False,
    precondition: float | None = None,
    verified: set | None = None,
    warned: list[bool] | None = None,
    layouts: dict | None = None,
) -> ChainMap:
    """Build the :class:`ChainMap` of one batch ``x`` (see the module docstring).

    ``head`` is the final ``nn.Linear`` when the chain is its weight (the default), else
    ``None``. ``verified`` caches the batch shapes whose one-matmul path was checked;
    ``warned`` (a one-element list) makes the rank warning fire once per kernel.
    ``layouts`` caches, per batch shape, the checked slices of an encoder that is
    ``head(trunk(x))`` (:func:`sequential_trunk`): later batches of that shape run the
    trunk alone, without the head's matmul and the capture hook.
    """
    warned = [False] if warned is None else warned
    features = slices = None
    trunk = cached = None
    if head is not None and layouts is not None:
        trunk = sequential_trunk(encoder, head)
        cached = None if trunk is None else layouts.get(tuple(x.shape))
    if head is not None:
        with torch.set_grad_enabled(keep_graph):
            if cached is not None:
                features = x
                for module in trunk:
                    features = module(features)
            else:
                out, features, y, calls = run_capturing(encoder, head, x)
        _check_rank(features.shape[-1], x.shape[0], warned)
        if cached is not None:
            slices = cached
        else:
            values = as_dict(out)
            slices = head_slices(values, y) if calls == 1 else None
    elif (final := final_linear(encoder)) is not None:
        _check_rank(final[1].in_features, x.shape[0], warned)
    if precondition is not None:
        phi0 = head.weight.detach().clone()
        A = _preconditioner(features.detach(), precondition)
        start = torch.zeros(phi0.shape[0] * A.shape[0], dtype=phi0.dtype, device=phi0.device)

        def params_of(c: Tensor) -> list[Tensor]:
            return [phi0 + c.view(phi0.shape[0], A.shape[0]) @ A]
    else:
        start = torch.cat([p.detach().reshape(-1) for p in chain_params])

        def params_of(c: Tensor) -> list[Tensor]:
            if len(chain_params) == 1:  # the usual case: one view, no slice in the graph
                return [c.view(chain_params[0].shape)]
            out, i = [], 0
            for p in chain_params:
                out.append(c[i : i + p.numel()].view_as(p))
                i += p.numel()
            return out

    if slices is not None:
        bias = head.bias

        width = head.out_features
        whole = next(iter(slices)) if list(slices.values()) == [(0, width)] else None

        def local_values(c: Tensor) -> dict[str, Tensor]:
            y = F.linear(features, params_of(c)[0], bias)
            if whole is not None:  # one site is the whole output: no slice in the graph
                return {whole: y}
            return {n: y[..., a:b] for n, (a, b) in slices.items()}

        key = ("matmul", tuple(x.shape))
        if verified is not None and key not in verified:
            with torch.no_grad():
                same = all(torch.equal(local_values(start)[n], values[n]) for n in slices)
            if not same:  # the encoder does something after the head: re-run it instead
                slices = None
            verified.add(key)
        if trunk is not None and cached is None and slices is not None and key in verified:
            layouts[tuple(x.shape)] = slices
    if slices is None:

        def local_values(c: Tensor) -> dict[str, Tensor]:
            params = dict(zip(param_names, params_of(c)))
            return as_dict(torch.func.functional_call(encoder, params, (x,)))

        key = ("affine", tuple(x.shape))
        if verified is not None and key not in verified:
            check_affine(local_values, start, param_names)
            verified.add(key)
    return ChainMap(start, params_of, local_values, features, slices)


@torch.no_grad()
def check_affine(
    local_values: Callable[[Tensor], dict[str, Tensor]], position: Tensor, param_names
) -> None:
    r"""Refuse an encoder whose output is not affine in the chain parameters, or a site
    the chain does not move.

    ALD's correctness argument needs :math:`z = A(x)\,\phi + c(x)`: a transform such
    as ``exp`` after the chain's layer changes the law the chain samples (no
    Jacobian). Checked by a second difference along a random direction :math:`d`,
    :math:`f(\phi + d) - 2 f(\phi) + f(\phi - d) = 0` for affine :math:`f`.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)  # no draw from the global RNG
    d = torch.randn(position.shape, generator=gen).to(position)
    d = d * (position.abs().mean() + 1.0) * 0.5
    f0, fp, fm = (local_values(p) for p in (position, position + d, position - d))
    tol = 1e-3 if position.dtype == torch.float32 else 1e-8
    for name in f0:
        second = (fp[name] - 2 * f0[name] + fm[name]).abs().max()
        moved = (fp[name] - fm[name]).abs().max()
        size = moved + f0[name].abs().max() + 1e-12
        if not torch.isfinite(second) or second > tol * size:
            raise ValueError(
                f"the encoder output {name!r} is not affine in the chain parameters "
                f"{list(param_names)} (relative second difference {float(second / size):.2g})"
                "; ALD samples the wrong law then: end the encoder with the chain's "
                "nn.Linear and move output transforms (exp, softplus) into the model, or "
                "name affine params="
            )
        if not moved > 0:
            raise ValueError(
                f"latent site {name!r} does not depend on the chain parameters "
                f"{list(param_names)}, so ALD never moves it: name the weight of the layer "
                "that outputs it in params= too (or output every site from one final "
                "nn.Linear)"
            )


@torch.no_grad()
def solve_head_weight(
    features: Tensor, head: nn.Linear, slices: dict[str, tuple[int, int]], u: dict[str, Tensor]
) -> Tensor:
    r"""The head weight :math:`\Phi` with :math:`G \Phi^\top + b` equal to the given
    unconstrained site values in their columns (others kept), by minimum-norm least
    squares; refuses in one line if the features cannot reproduce them."""
    bias = head.bias if head.bias is not None else 0.0
    target = F.linear(features, head.weight, head.bias).detach().clone()
    for name, (a, b) in slices.items():
        value = torch.as_tensor(u[name]).to(target)
        if value.shape != target[:, a:b].shape:
            raise ValueError(
                f"initial latents for {name!r} have shape {tuple(value.shape)}; pass shape "
                f"{tuple(target[:, a:b].shape)}"
            )
        target[:, a:b] = value
    target = target - bias
    weight_t = torch.linalg.pinv(features) @ target
    residual = (features @ weight_t - target).abs().max()
    if residual > 1e-4 * (1.0 + target.abs().max()):
        raise ValueError(
            f"the encoder's {features.shape[1]} features cannot reproduce the given latents "
            f"of {features.shape[0]} rows (residual {float(residual):.2g}); widen the "
            "encoder's last hidden layer or key initial_params by parameter names"
        )
    return weight_t.T
