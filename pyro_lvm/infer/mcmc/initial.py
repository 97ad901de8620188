"""Where an ALD chain starts: ``initial_params`` keyed by latent site or by chain parameter,
and dispersed starts for later chains.

Keyed by site, the heads' weights are solved so that the encoder outputs the given
(unconstrained) latents: minimum-norm least squares on the captured features
(:func:`~pyro_lvm.infer.mcmc.chain.solve_head_weight`), refused in one line when the
features cannot reproduce them. Keyed by parameter name, the values are copied in.
Global sites take their given (constrained) values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from pyro_lvm.infer import sites as S
from pyro_lvm.infer.mcmc.ald import ALDState
from pyro_lvm.infer.mcmc.chain import ChainSpec, run_capturing, solve_head_weight

__all__ = ["apply_initial_params", "check_initial_keys"]


def check_initial_keys(
    params: Mapping[str, Tensor], latent_sites: Sequence[str], encoder: nn.Module
) -> None:
    """One-line error unless ``params`` holds every local site or only parameter names."""
    keys, names = set(params), {n for n, _ in encoder.named_parameters()}
    if not set(latent_sites) <= keys and not keys <= names:
        named = (
            f"site {latent_sites[0]!r}"
            if len(latent_sites) == 1
            else f"sites {list(latent_sites)}"
        )
        raise ValueError(
            f"initial_params must be keyed by the latent {named} (plus any global sites) or "
            f"by chain parameter names, got {sorted(keys)}"
        )


def apply_initial_params(
    init: Mapping[str, Tensor],
    spec: ChainSpec,
    sites: S.ModelSites,
    state: ALDState,
    encoder: nn.Module,
    x: Tensor,
    *,
    prior: Mapping[str, Tensor] | None = None,
) -> ALDState:
    """Write ``init`` into the encoder's chain parameters (and the state's globals); with
    no local site given, ``prior`` (a draw of the local sites) is the start."""
    names = [*sites.local_names, *sites.global_names]
    unknown = set(init) - {*names, *spec.param_names}
    if unknown:
        raise ValueError(
            f"initial_params has keys {sorted(unknown)} that are neither latent sites "
            f"{names} nor chain parameters {list(spec.param_names)}; key them by site or "
            "parameter name"
        )
    with torch.no_grad():
        for name, p in zip(spec.param_names, spec.params):
            if name in init:
                p.copy_(init[name])
    local = {n: init[n] for n in sites.local_names if n in init}
    if not local and prior is not None and spec.heads is not None:
        local = dict(prior)
    if local:
        _solve_weights(spec, sites, S.unconstrain(sites, local), encoder, x)
    if any(n in init for n in sites.global_names):
        current = S.constrain(sites, S.global_values(sites, state.globals))
        values = S.unconstrain(sites, {n: init.get(n, current[n]) for n in sites.global_names})
        state = state._replace(globals=torch.cat([values[n].reshape(-1) for n in values]))
    return state


def _solve_weights(spec, sites, u: dict[str, Tensor], encoder: nn.Module, x: Tensor) -> None:
    """Set the heads' weights so that the encoder outputs ``u``, or refuse in one line."""
    if spec.heads is None:
        names = list(u)
        raise ValueError(
            f"initial_params keyed by {names[0] if len(names) == 1 else names!r} needs sites "
            "that are nn.Linear head outputs; key them by parameter names "
            f"{list(spec.param_names)} instead"
        )
    missing = [n for n in sites.local_names if n not in u]
    if missing:
        raise ValueError(f"initial_params lacks latent sites {missing}; give every local site")
    with torch.no_grad():
        _, captured = run_capturing(encoder, [h.module for h in spec.heads], x)
        for head, calls in zip(spec.heads, captured):
            head.module.weight.copy_(solve_head_weight(calls[0][0], head.module, head.sites, u))
