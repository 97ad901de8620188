r"""ALD against NUTS on Pyro models written by others: mixing, accuracy, ESS per second.

For each case a Pyro model from ``tests/outside_models`` (ports of Pyro's examples) is
fixed (its networks trained briefly by SVI where it has any), and the posterior of a few
rows is sampled twice with :class:`pyro.infer.MCMC`: by NUTS (the reference) and by
:class:`~pyro_lvm.infer.AmortizedLangevin` in each ``--settings`` entry. Per seed and
setting it reports, over the compared coordinates of the local latents (and global ones
where the model has them): the smallest effective sample size and ESS per draw, ESS per
CPU second, the largest :math:`|z|` of the posterior means against NUTS's with the
combined Monte Carlo standard errors (:mod:`pyro_lvm.infer.mcse`) and the fraction of
coordinates beyond 3, acceptance and step size.

Cases (``--cases``):

``vae3``, ``vae100``  Pyro's VAE example (``examples/vae/vae.py``) on digits, 3 / 100
                      test rows
``dmm``               Pyro's deep Markov model (``examples/dmm.py``), 4 synthetic
                      sequences, two of them shorter (masked padding steps are flat:
                      left out of the comparison, their largest |value| reported)
``sgdef``             Pyro's sparse gamma DEF (``examples/sparse_gamma_def.py``), Gamma
                      latents, global weights in the chain state

Settings (``--settings``): ``default`` (the kernel's defaults), ``no-precondition``
(``precondition=None``: the default before the kernel was restructured) and
``precondition`` (``precondition=1e-3``). The VAE example's encoder is passed as its
authors wrote it (it returns ``(loc, scale)``; the chain is the layer that outputs
``loc``). The DMM's guide samples :math:`z_t` from :math:`z_{t-1}` (no encoder
:math:`x \mapsto z`), so its trunk feeds one head for every site
(``tests/outside_models/wrappers.py``); the sparse gamma DEF has no encoder, so ALD
gets a small MLP. ``--kernel-arg NAME=VALUE`` adds keyword arguments to every
``AmortizedLangevin`` (Python literals), e.g. to try a changed kernel; a refusal is
recorded as the row's ``error``.

    python benchmarks/ald_vs_nuts.py [--cases vae3 vae100 dmm sgdef] [--seeds 0 1 2]

Prints a markdown table (median [min, max] over seeds) and writes JSON to
``benchmarks/results/ald_vs_nuts.json``. Each case's posterior is fixed (networks trained
with ``--model-seed``) and sampled once by NUTS (``--nuts-seed``, one chain): the
reference every ALD seed is compared with. Timings are thread CPU seconds of
``MCMC.run`` on one thread: on a shared machine read them as ratios between rows run in
the same invocation.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from outside_models import dmm as D  # noqa: E402
from outside_models import sparse_gamma_def as SG  # noqa: E402
from outside_models import vae as V  # noqa: E402
from outside_models.wrappers import (  # noqa: E402
    DictEncoder,
    DMMEncoder,
    UnmaskLatents,
    dmm_encoder_input,
)

from pyro_lvm.infer import AmortizedLangevin  # noqa: E402
from pyro_lvm.infer.mcse import compare_draws, max_z_threshold  # noqa: E402

CASES = ["vae3", "vae100", "dmm", "sgdef"]
SETTINGS = {
    "default": {},
    "no-precondition": {"precondition": None},
    "precondition": {"precondition": 1e-3},
}
#: draws (and warmup) per case, ALD and NUTS: the issue's 3000 / 6000 / 8000 ALD draws
DRAWS = {"vae3": 3000, "vae100": 3000, "dmm": 6000, "sgdef": 8000}
#: NUTS (draws, warmup) per case: fewer where a NUTS draw is dear (its MCSE is part of
#: every z-score, so fewer draws only widen the combined standard error)
NUTS_DRAWS = {
    "vae3": (2000, 1000),
    "vae100": (1000, 500),
    "dmm": (1000, 500),
    "sgdef": (1000, 500),
}


class Case(NamedTuple):
    """A fixed model, its arguments, and how ALD reads the latents."""

    name: str
    model: Callable
    args: tuple
    latent_sites: list[str]
    #: () -> (encoder, extra AmortizedLangevin kwargs)
    encoder: Callable[[], tuple[nn.Module, dict]]
    #: site -> boolean mask of the coordinates to compare (None: all)
    select: dict[str, torch.Tensor] | None
    #: site -> boolean mask of flat (masked) coordinates whose wander is reported
    flat: dict[str, torch.Tensor] | None


def vae_case(name: str, rows: int, args, seed: int) -> Case:
    """Pyro's VAE example trained 1000 SVI steps on digits; the posterior of ``rows``
    test rows."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    x_train, x_test = V.digits()
    vae = V.VAE(z_dim=args.vae_z_dim, hidden_dim=args.vae_hidden_dim, input_dim=64)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=Trace_ELBO())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.svi_steps):
        svi.step(x_train[torch.randperm(len(x_train), generator=gen)[:100]])
    x = x_test[:rows]

    def encoder() -> tuple[nn.Module, dict]:
        return vae.encoder, {}

    return Case(name, vae.model, (x,), ["latent"], encoder, None, None)


def dmm_case(args, seed: int) -> Case:
    """Pyro's DMM trained 1000 SVI steps on synthetic sequences; the posterior of 4 test
    sequences of lengths T, T, T - 2, T - 3."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    T = 6
    seqs, lengths = D.synthetic_sequences(256, T, 8, min_length=3, seed=0)
    dmm = D.DMM(input_dim=8, z_dim=4, emission_dim=16, transition_dim=16, rnn_dim=32)
    svi = SVI(dmm.model, dmm.guide, pyro.optim.Adam({"lr": 3e-3}), loss=Trace_ELBO())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.svi_steps):
        index = torch.randperm(len(seqs), generator=gen)[:32]
        svi.step(*D.get_mini_batch(index, seqs, lengths))
    test, _ = D.synthetic_sequences(4, T, 8, seed=1)
    test_lengths = torch.tensor([T, T, T - 2, T - 3])
    test = test * (torch.arange(T) < test_lengths[:, None])[..., None]
    batch = D.get_mini_batch(torch.arange(4), test, test_lengths)
    mask = batch[2].bool()
    names = [f"z_{t}" for t in range(1, T + 1)]
    select = {n: mask[:, t, None] for t, n in enumerate(names)}
    flat = {n: ~mask[:, t, None] for t, n in enumerate(names)}

    def encoder() -> tuple[nn.Module, dict]:
        return DMMEncoder(dmm, T), {"encoder_input": dmm_encoder_input}

    return Case("dmm", dmm.model, batch, names, encoder, select, flat)


def sgdef_case(args, seed: int) -> Case:
    """Pyro's sparse gamma DEF (widths 3-2-2, 12 pixels) on 8 synthetic count images;
    the joint posterior of the global weights and the local latents."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    x = SG.synthetic_counts(8, image_size=12, seed=0)
    sg = SG.SparseGammaDEF(top_width=3, mid_width=2, bottom_width=2, image_size=12)
    sizes = {"z_top": 3, "z_mid": 2, "z_bottom": 2}

    def encoder() -> tuple[nn.Module, dict]:
        trunk = nn.Sequential(nn.Linear(12, 32), nn.Tanh())
        return DictEncoder(trunk, 32, sizes), {}

    return Case("sgdef", sg.model, (x,), list(sizes), encoder, None, None)


def build_case(name: str, args, seed: int) -> Case:
    if name == "vae3":
        return vae_case(name, 3, args, seed)
    if name == "vae100":
        return vae_case(name, 100, args, seed)
    if name == "dmm":
        return dmm_case(args, seed)
    return sgdef_case(args, seed)


def timed_run(mcmc: MCMC, args: tuple) -> tuple[float, float]:
    cpu, wall = time.thread_time(), time.perf_counter()
    mcmc.run(*args)
    return time.thread_time() - cpu, time.perf_counter() - wall


def run_nuts(
    case: Case, draws: int, warmup: int, seed: int, max_tree_depth: int = 10
) -> tuple[dict, dict]:
    pyro.set_rng_seed(1000 + seed)  # never the stream of an ALD run
    model = UnmaskLatents()(case.model) if case.flat is not None else case.model
    kernel = NUTS(model, max_tree_depth=max_tree_depth)
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=True)
    cpu, wall = timed_run(mcmc, case.args)
    samples = {k: v.detach() for k, v in mcmc.get_samples().items()}
    diag = mcmc.diagnostics()
    info = {
        "cpu_s": cpu,
        "wall_s": wall,
        "divergences": sum(len(v) for v in diag.get("divergences", {}).values()),
        "accept_rate": float(next(iter(diag.get("acceptance rate", {0: float("nan")}).values()))),
    }
    return samples, info


def run_ald(
    case: Case, setting: str, kernel_args: dict, draws: int, warmup: int, seed: int
) -> tuple[dict, dict]:
    pyro.set_rng_seed(seed)
    encoder, extra = case.encoder()
    options = {"latent_site": case.latent_sites, **SETTINGS[setting], **extra, **kernel_args}
    if len(case.latent_sites) == 1:
        options["latent_site"] = case.latent_sites[0]
    kernel = AmortizedLangevin(case.model, encoder, **options)
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=True)
    cpu, wall = timed_run(mcmc, case.args)
    samples = {k: v.detach() for k, v in mcmc.get_samples().items()}
    diag = kernel.diagnostics()
    info = {
        "cpu_s": cpu,
        "wall_s": wall,
        "accept_rate": diag["accept_rate"],
        "step_size": diag["step_size"],
    }
    return samples, info


def compare(case: Case, ald: dict, nuts: dict) -> dict:
    result = compare_draws(ald, nuts, select=case.select)
    out = {
        "min_ess": result.min_ess,
        "min_ess_per_draw": result.min_ess_per_draw,
        "max_abs_z": result.max_abs_z,
        "frac_abs_z_above_3": result.frac_abs_z_above_3,
        "num_coordinates": result.num_coordinates,
        "z_threshold_1pct": max_z_threshold(result.num_coordinates, 0.01),
    }
    if case.flat is not None:
        flat = [ald[n][:, case.flat[n].expand_as(ald[n][0])].abs() for n in case.flat]
        flat = torch.cat([f.reshape(-1) for f in flat])
        out["flat_abs_max"] = float(flat.max()) if flat.numel() else 0.0
    return out


def nuts_quality(case: Case, nuts: dict) -> dict:
    """NUTS's own min ESS over the compared coordinates (its reliability as a reference)."""
    result = compare_draws(nuts, nuts, select=case.select)
    return {"min_ess": result.min_ess, "min_ess_per_draw": result.min_ess_per_draw}


def _literal(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"--kernel-arg takes NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def _fmt(values: list[float], digits: int = 1) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    med = statistics.median(values)
    return f"{med:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def table(rows: list[dict], args) -> str:
    lines = [
        f"ALD vs NUTS, seeds {args.seeds}, kernel args "
        f"{dict(args.kernel_arg) or '{}'}; median [min, max] over seeds; ESS and |z| over "
        "the compared coordinates; CPU s of MCMC.run (one thread, shared machine)",
        "",
        "| case | sampler | draws | min ESS | min ESS / draw | min ESS / CPU s | max abs z "
        "| frac abs z > 3 | accept | step size | flat max | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in args.cases:
        for sampler in ["nuts", *args.settings]:
            sel = [r for r in rows if r["case"] == case and r["sampler"] == sampler]
            if not sel:
                continue
            errors = [r["error"] for r in sel if "error" in r]
            if errors:
                lines.append(f"| {case} | {sampler} | refused: {errors[0]} |")
                continue

            def get(key: str, sel: list[dict] = sel) -> list:
                return [r.get(key) for r in sel]

            lines.append(
                f"| {case} | {sampler} | {sel[0]['draws']} | {_fmt(get('min_ess'))} | "
                f"{_fmt(get('min_ess_per_draw'), 4)} | {_fmt(get('min_ess_per_cpu_s'), 2)} | "
                f"{_fmt(get('max_abs_z'), 2)} | {_fmt(get('frac_abs_z_above_3'), 3)} | "
                f"{_fmt(get('accept_rate'), 2)} | {_fmt(get('step_size'), 6)} | "
                f"{_fmt(get('flat_abs_max'), 1)} | {_fmt(get('cpu_s'), 1)} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    p.add_argument(
        "--settings", nargs="+", default=["default", "precondition"], choices=list(SETTINGS)
    )
    p.add_argument("--kernel-arg", type=_literal, action="append", default=[])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--draws", type=int, default=None, help="ALD draws (default: per case)")
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--nuts-draws", type=int, default=None, help="default: per case")
    p.add_argument("--nuts-warmup", type=int, default=None, help="default: per case")
    p.add_argument("--nuts-max-tree-depth", type=int, default=10)
    p.add_argument("--svi-steps", type=int, default=1000)
    p.add_argument("--model-seed", type=int, default=0, help="seed of the SVI-trained networks")
    p.add_argument("--nuts-seed", type=int, default=0)
    p.add_argument("--vae-z-dim", type=int, default=10)
    p.add_argument("--vae-hidden-dim", type=int, default=400)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ald_vs_nuts.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    kernel_args = dict(args.kernel_arg)
    rows = []
    for case_name in args.cases:
        # one fixed posterior per case (networks trained with --model-seed), one NUTS
        # reference run; ALD runs once per seed against it
        case = build_case(case_name, args, args.model_seed)
        nuts_draws = args.nuts_draws or NUTS_DRAWS[case_name][0]
        nuts_warmup = args.nuts_warmup or NUTS_DRAWS[case_name][1]
        nuts, info = run_nuts(
            case, nuts_draws, nuts_warmup, args.nuts_seed, args.nuts_max_tree_depth
        )
        quality = nuts_quality(case, nuts)
        rows.append(
            {
                "case": case_name,
                "sampler": "nuts",
                "seed": args.nuts_seed,
                "draws": nuts_draws,
                **info,
                **quality,
                "min_ess_per_cpu_s": quality["min_ess"] / info["cpu_s"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        for seed in args.seeds:
            for setting in args.settings:  # interleaved per seed: load hits both alike
                draws = args.draws or DRAWS[case_name]
                row = {"case": case_name, "sampler": setting, "seed": seed, "draws": draws}
                try:
                    ald, info = run_ald(case, setting, kernel_args, draws, args.warmup, seed)
                except ValueError as err:  # a refusal: recorded, not hidden
                    row["error"] = str(err)
                else:
                    row.update(info)
                    row.update(compare(case, ald, nuts))
                    row["min_ess_per_cpu_s"] = row["min_ess"] / info["cpu_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    text = table(rows, args)
    print(text)
    result = {"args": {**vars(args), "kernel_arg": kernel_args}, "rows": rows, "table": text}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
