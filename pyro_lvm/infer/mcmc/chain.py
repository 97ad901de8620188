r"""The ALD chain state: which encoder parameters it is, and how it gives the latents.

ALD runs MALA on encoder parameters :math:`\phi` and reads the latents off the encoder.
:func:`find_chain` decides, once per kernel, which parameters: the weight of each
``nn.Linear`` *head* whose output is a site's value (``y`` itself or a column slice
``y[:, a:b]``, as in ``loc = self.fc21(hidden)``), found by hooking every ``nn.Linear``
during one encoder call, or the parameters named by ``params=``. Per batch,
:func:`chain_map` returns a :class:`ChainMap`: the flat chain coordinates at the encoder's
current weights and a closure from coordinates to the local sites' values.

**Heads: one matmul per proposal.** With heads, the head inputs :math:`G_h` (the trunk
features) are captured once per batch and a proposal costs
:math:`G_h \Phi_h^\top + b_h` per head (checked once per batch shape against the encoder's
own output). Otherwise the encoder is re-run with the proposed parameters
(``torch.func.functional_call``), after checking once per batch shape that its output is
affine in them (:func:`check_affine`). An ``nn.Sequential`` encoder ending in its one head,
with no forward hooks (:func:`sequential_trunk`), is ``head(trunk(x))`` by construction:
once a batch shape has been checked, later batches of that shape run the trunk alone.

**Preconditioning** (``precondition=`` :math:`\lambda`): per batch the chain moves
:math:`\Phi_h = \Phi_{h,0} + U_h A_h` with :math:`A_h = (G_h G_h^\top + \lambda\bar e I)^{-1}
G_h` per head, and MALA runs on the :math:`U_h` (one column per datapoint); the latents
move as per-datapoint Langevin in latent space whatever the conditioning of :math:`G_h`.
Re-run encoders get the same from their Jacobian :math:`J = \partial z / \partial\phi`
(constant, the output being affine): :math:`\phi = \phi_0 + J^\top (J J^\top +
\lambda\bar e I)^{-1} u`. Both are fixed linear reparametrizations per batch, so the
stationary law of the latents is unchanged (see ``docs/langevin.md``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from pyro_lvm.collective import all_gather_cat

__all__ = [
    "RankConditionWarning",
    "Head",
    "ChainSpec",
    "ChainCache",
    "ChainMap",
    "encoder_values",
    "find_chain",
    "run_capturing",
    "sequential_trunk",
    "chain_map",
    "check_affine",
    "solve_head_weight",
]

#: entries of the Jacobian a re-run encoder's preconditioner may hold (about 400 MB)
MAX_JACOBIAN_ENTRIES = 10**8


class RankConditionWarning(UserWarning):
    """The encoder has fewer features than the batch has rows: ALD samples then collapse."""


class Head(NamedTuple):
    """An ``nn.Linear`` whose output columns are latent site values."""

    name: str
    module: nn.Linear
    #: ``{site: (a, b)}``: the site's value is ``output[..., a:b]``
    sites: dict[str, tuple[int, int]]


class ChainSpec(NamedTuple):
    """Which encoder parameters form the chain (decided once per kernel)."""

    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    #: the heads whose weights are ``params`` (in order), or ``None``: re-run the encoder
    heads: tuple[Head, ...] | None


class ChainCache:
    """What a kernel remembers between batches: the chain it found, the batch shapes
    whose fast path was checked, the trunk-only layouts, whether the rank warning
    fired."""

    def __init__(self) -> None:
        self.spec: ChainSpec | None = None
        self.verified: set = set()
        self.layouts: dict = {}
        self.rank_warned = False


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
    features : tuple of Tensor or None
        Each head's input :math:`G_h` (captured), on the head path.
    matmul : bool
        Whether a proposal costs one matmul per head (else the encoder is re-run).
    """

    start: Tensor
    params_of: Callable[[Tensor], list[Tensor]]
    local_values: Callable[[Tensor], dict[str, Tensor]]
    features: tuple[Tensor, ...] | None
    matmul: bool


# -- the encoder's output -----------------------------------------------------------------


def _loc(value: Any, name: str) -> Any:
    if isinstance(value, (tuple, list)) and len(value) == 2 and torch.is_tensor(value[0]):
        return value[0]  # a (loc, scale) pair, as amortized Pyro guides return: the loc
    return value


def encoder_values(out: Any, sites: Sequence[str]) -> dict[str, Tensor]:
    """The encoder's output as ``{site: unconstrained value}``: a Tensor (one site), a
    dict (site -> value), or a ``(loc, scale)`` pair, per site or for the one site, whose
    ``loc`` is the value."""
    out = _loc(out, sites[0]) if len(sites) == 1 else out
    if torch.is_tensor(out) and len(sites) == 1:
        return {sites[0]: out}
    if isinstance(out, dict) and set(out) == set(sites):
        values = {n: _loc(out[n], n) for n in sites}
        if all(torch.is_tensor(v) for v in values.values()):
            return values
    got = sorted(out) if isinstance(out, dict) else type(out).__name__
    raise ValueError(
        f"the encoder returned {got} for latent sites {list(sites)}; return a Tensor or a "
        "(loc, scale) pair for one site, or a dict mapping each latent site to its value"
    )


# -- finding the chain ----------------------------------------------------------------------


def run_capturing(
    encoder: nn.Module, modules: Sequence[nn.Linear], x: Tensor
) -> tuple[Any, list[list[tuple[Tensor, Tensor]]]]:
    """``encoder(x)`` with each module's calls captured: ``(out, [[(input, output)...]])``."""
    captured: list[list[tuple[Tensor, Tensor]]] = [[] for _ in modules]
    handles = []
    for i, module in enumerate(modules):

        def hook(m, inputs, output, i=i):
            captured[i].append((inputs[0], output))

        handles.append(module.register_forward_hook(hook))
    try:
        out = encoder(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, captured


def _slice_of(value: Tensor, y: Tensor) -> tuple[int, int] | None:
    """``(a, b)`` if ``value`` is ``y`` or ``y[..., a:b]`` (same storage), else ``None``."""
    if y.dim() != 2 or not y.is_contiguous():
        return None
    if value is y:
        return 0, y.shape[1]
    same = value.dim() == 2 and value.shape[0] == y.shape[0] and value.stride() == y.stride()
    if not same or value.untyped_storage().data_ptr() != y.untyped_storage().data_ptr():
        return None
    a = value.storage_offset() - y.storage_offset()
    return (a, a + value.shape[1]) if 0 <= a and a + value.shape[1] <= y.shape[1] else None


def _producers(value: Tensor, outputs: list[Tensor]) -> list[int]:
    """Indices of the ``outputs`` that ``value`` depends on (through autograd)."""
    live = [i for i, y in enumerate(outputs) if y.requires_grad]
    if not value.requires_grad or not live:
        return list(range(len(outputs)))
    grads = torch.autograd.grad(
        value.sum(), [outputs[i] for i in live], allow_unused=True, retain_graph=True
    )
    return [i for i, g in zip(live, grads) if g is not None]


def find_chain(
    encoder: nn.Module, x: Tensor, sites: Sequence[str], params: Sequence[str] | None
) -> ChainSpec:
    """The chain parameters of ``encoder`` (see the module docstring), from one call.

    Without ``params``: each site's value must be the output (or a column slice) of an
    ``nn.Linear`` called once, its head; else the last ``nn.Linear`` the value depends on
    is proposed, for :func:`check_affine` to accept or refuse. With ``params``: those,
    on the head path when they are exactly the heads' weights.
    """
    named = dict(encoder.named_parameters())
    if params is not None:
        missing = [p for p in params if p not in named]
        if not params or missing:
            raise ValueError(
                f"params {missing or list(params)} are not parameters of the encoder; choose "
                f"from {sorted(named)}"
            )
    linears = [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    if not linears and params is None:
        raise ValueError(
            f"encoder {type(encoder).__name__} has no nn.Linear layer whose weight could be "
            "the chain state; name the chain parameters with params=[...]"
        )
    probe = x.detach().requires_grad_(x.is_floating_point())
    with torch.enable_grad():
        out, captured = run_capturing(encoder, [m for _, m in linears], probe)
        values = encoder_values(out, sites)
        heads: dict[int, dict[str, tuple[int, int]]] = {}
        fallback: list[int] = []
        for site, value in values.items():
            found = None
            for i, calls in enumerate(captured):
                if len(calls) == 1 and (cols := _slice_of(value, calls[0][1])) is not None:
                    found = (i, cols)
            if found is not None:
                heads.setdefault(found[0], {})[site] = found[1]
                continue
            outputs = [(i, y) for i, calls in enumerate(captured) for _, y in calls]
            used = _producers(value, [y for _, y in outputs])
            if not used:
                raise ValueError(
                    f"latent site {site!r} does not come from any nn.Linear of the encoder; "
                    "name the chain parameters with params=[...] (the output must be affine "
                    "in them)"
                )
            fallback.append(outputs[used[-1]][0])
    names = [f"{linears[i][0]}.weight" if linears[i][0] else "weight" for i in heads]
    if params is not None:
        if not fallback and sorted(params) == sorted(names):
            order = [names.index(p) for p in params]
            keys = list(heads)
            spec_heads = tuple(_head(linears[keys[j]], heads[keys[j]]) for j in order)
            return ChainSpec(tuple(params), tuple(named[p] for p in params), spec_heads)
        return ChainSpec(tuple(params), tuple(named[p] for p in params), None)
    if not fallback:
        spec_heads = tuple(_head(linears[i], cols) for i, cols in heads.items())
        return ChainSpec(tuple(names), tuple(named[n] for n in names), spec_heads)
    for i in fallback:
        name = f"{linears[i][0]}.weight" if linears[i][0] else "weight"
        if name not in names:
            names.append(name)
    return ChainSpec(tuple(names), tuple(named[n] for n in names), None)


def _head(linear: tuple[str, nn.Linear], cols: dict[str, tuple[int, int]]) -> Head:
    return Head(linear[0], linear[1], dict(cols))


def sequential_trunk(encoder: nn.Module, head: nn.Linear) -> list[nn.Module] | None:
    """The modules before ``head`` when ``encoder(x)`` is exactly ``head(trunk(x))``: an
    ``nn.Sequential`` (keeping its ``forward`` and call) ending in ``head`` (used once),
    with no forward hooks on it, on the head or registered globally; else ``None``."""
    kind = type(encoder)
    if not isinstance(encoder, nn.Sequential) or kind.forward is not nn.Sequential.forward:
        return None
    for module in (encoder, head):
        call = type(module)
        if call.__call__ is not nn.Module.__call__ or call._call_impl is not nn.Module._call_impl:
            return None
    trunk = list(encoder)[:-1]
    if not len(encoder) or encoder[-1] is not head or any(m is head for m in trunk):
        return None
    hooked = (encoder._forward_hooks, encoder._forward_pre_hooks)
    hooked += (head._forward_hooks, head._forward_pre_hooks)
    hooked += (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks)
    return None if any(hooked) else trunk


# -- one batch ------------------------------------------------------------------------------


def _check_rank(widths: Sequence[int], batch_size: int, cache: ChainCache) -> None:
    narrow = min(widths)
    if narrow < batch_size and not cache.rank_warned:
        cache.rank_warned = True
        warnings.warn(
            f"the encoder has {narrow} features for a batch of {batch_size}: ALD "
            "samples collapse when the feature width is below the batch size; widen the "
            "encoder's last hidden layer or use smaller batches",
            RankConditionWarning,
            stacklevel=5,
        )


def _head_features(spec, encoder, x, sites, cache, keep_graph):
    """Each head's input (and output) on ``x``; the trunk alone where that is exact."""
    key = tuple(x.shape)
    trunk = sequential_trunk(encoder, spec.heads[0].module) if len(spec.heads) == 1 else None
    with torch.set_grad_enabled(keep_graph):
        if trunk is not None and key in cache.layouts:
            features = x
            for module in trunk:
                features = module(features)
            return (features,), None, trunk
        out, captured = run_capturing(encoder, [h.module for h in spec.heads], x)
    if any(len(calls) != 1 for calls in captured):
        raise ValueError(
            "a head of the chain was called more than once by the encoder; name the chain "
            "parameters with params=[...]"
        )
    features = tuple(calls[0][0] for calls in captured)
    return features, (encoder_values(out, sites), [calls[0][1] for calls in captured]), trunk


def _weights_of(spec: ChainSpec, features, precondition: float | None):
    """``(start, params_of)``: plain coordinates (the weights) or, preconditioned, the
    per-datapoint coordinates :math:`U_h` of :math:`\\Phi_h = \\Phi_{h,0} + U_h A_h`."""
    if precondition is None or features is None:
        start = torch.cat([p.detach().reshape(-1) for p in spec.params])
        return start, _splitter([p.shape for p in spec.params])
    bases = [p.detach().clone() for p in spec.params]
    # data parallel: the union batch's features, so every rank holds the same chain
    maps = [_preconditioner(all_gather_cat(g.detach()), precondition) for g in features]
    shapes = [(w.shape[0], a.shape[0]) for w, a in zip(bases, maps)]
    split = _splitter(shapes)
    start = torch.zeros(
        sum(a * b for a, b in shapes), dtype=bases[0].dtype, device=bases[0].device
    )

    def params_of(c: Tensor) -> list[Tensor]:
        return [w + u @ a for w, u, a in zip(bases, split(c), maps)]

    return start, params_of


def _splitter(shapes) -> Callable[[Tensor], list[Tensor]]:
    shapes = [torch.Size(s) for s in shapes]
    if len(shapes) == 1:  # the usual case: one view, no slice in the graph
        return lambda c: [c.view(shapes[0])]
    sizes = [s.numel() for s in shapes]
    return lambda c: [part.view(s) for part, s in zip(c.split(sizes), shapes)]


def _preconditioner(features: Tensor, damping: float) -> Tensor:
    r""":math:`A = (G G^\top + \lambda \bar e I)^{-1} G`."""
    gram = features @ features.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + damping * gram.diagonal().mean() * eye, features)


def chain_map(
    spec: ChainSpec,
    encoder: nn.Module,
    x: Tensor,
    sites: Sequence[str],
    cache: ChainCache,
    *,
    keep_graph: bool = False,
    precondition: float | None = None,
) -> ChainMap:
    """Build the :class:`ChainMap` of one batch ``x`` (see the module docstring)."""
    if spec.heads is not None:
        chain = _head_map(spec, encoder, x, sites, cache, keep_graph, precondition)
        if chain is not None:
            return chain
    return _rerun_map(spec, encoder, x, sites, cache, precondition)


def _head_map(spec, encoder, x, sites, cache, keep_graph, precondition) -> ChainMap | None:
    features, probe, trunk = _head_features(spec, encoder, x, sites, cache, keep_graph)
    _check_rank([g.shape[-1] for g in features], x.shape[0], cache)
    start, params_of = _weights_of(spec, features, precondition)
    heads = [(g, h.module.bias, h.sites) for g, h in zip(features, spec.heads)]
    whole = len(heads) == 1 and list(heads[0][2].values()) == [(0, heads[0][1].shape[0])]

    def local_values(c: Tensor) -> dict[str, Tensor]:
        out = {}
        for (g, bias, cols), weight in zip(heads, params_of(c)):
            y = F.linear(g, weight, bias)
            if whole:  # one site is the whole output: no slice in the graph
                return {next(iter(cols)): y}
            out.update({n: y[..., a:b] for n, (a, b) in cols.items()})
        return out

    key = ("matmul", tuple(x.shape))
    if key not in cache.verified:
        values, _ = probe
        with torch.no_grad():
            got = local_values(start if precondition is None else torch.zeros_like(start))
            same = all(torch.equal(got[n], values[n]) for n in sites)
        if not same:  # the encoder's value is not (or no longer) the heads' output
            return None
        cache.verified.add(key)
        if trunk is not None:
            cache.layouts[tuple(x.shape)] = True
    return ChainMap(start, params_of, local_values, features, True)


def _rerun_map(spec, encoder, x, sites, cache, precondition) -> ChainMap:
    names = spec.param_names
    start = torch.cat([p.detach().reshape(-1) for p in spec.params])
    split = _splitter([p.shape for p in spec.params])

    def values_at(c: Tensor) -> dict[str, Tensor]:
        out = torch.func.functional_call(encoder, dict(zip(names, split(c))), (x,))
        return encoder_values(out, sites)

    key = ("affine", tuple(x.shape))
    if key not in cache.verified:
        check_affine(values_at, start, names)
        cache.verified.add(key)
    if precondition is None:
        return ChainMap(start, split, values_at, None, False)
    move = _jacobian_preconditioner(values_at, start, sites, precondition)
    base = start.clone()

    def params_of(u: Tensor) -> list[Tensor]:
        return split(base + move @ u)

    def local_values(u: Tensor) -> dict[str, Tensor]:
        return values_at(base + move @ u)

    return ChainMap(torch.zeros(move.shape[1]).to(start), params_of, local_values, None, False)


def _jacobian_preconditioner(values_at, start: Tensor, sites, damping: float) -> Tensor:
    r""":math:`J^\top (J J^\top + \lambda\bar e I)^{-1}` for the (constant) Jacobian
    :math:`J` of the flat latents in the chain parameters, one vectorized backward pass."""

    def flat(c: Tensor) -> Tensor:
        values = values_at(c)
        return torch.cat([values[n].reshape(-1) for n in sites])

    with torch.no_grad():
        size = flat(start).numel()
    if size * start.numel() > MAX_JACOBIAN_ENTRIES:
        raise ValueError(
            f"precondition= needs the {size} x {start.numel()} Jacobian of the latents in "
            "the chain parameters, too large; pass precondition=None, use smaller batches, "
            "or let the sites be nn.Linear outputs (heads are preconditioned without it)"
        )
    _, vjp = torch.func.vjp(flat, start.detach())
    eye = torch.eye(size, dtype=start.dtype, device=start.device)
    (jac,) = torch.func.vmap(vjp)(eye)  # (size, params): J itself, one row per latent
    jac = jac.detach()
    gram = jac @ jac.T
    shift = (
        damping * gram.diagonal().mean() * torch.eye(size, dtype=gram.dtype, device=gram.device)
    )
    return torch.linalg.solve(gram + shift, jac).T


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
                "that outputs it in params= too (or output every site from an nn.Linear)"
            )


@torch.no_grad()
def solve_head_weight(
    features: Tensor, head: nn.Linear, cols: dict[str, tuple[int, int]], u: dict[str, Tensor]
) -> Tensor:
    r"""The head weight :math:`\Phi` with :math:`G \Phi^\top + b` equal to the given
    unconstrained site values in their columns (others kept), by minimum-norm least
    squares; refuses in one line if the features cannot reproduce them."""
    bias = head.bias if head.bias is not None else 0.0
    target = F.linear(features, head.weight, head.bias).detach().clone()
    for name, (a, b) in cols.items():
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
