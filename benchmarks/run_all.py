"""Every speed benchmark in one command: pyro_lvm against hand-written torch floors.

For each case (VAE step, LAE step, IWAE and AIS evaluation, score-function estimator
steps) at digits size and MNIST size, pyro_lvm's variant and the hand-written floor of
:mod:`floors` run on copies of the same modules and the same batch, interleaved step by
step with thread CPU time and wall time (see :mod:`harness`). Writes
``OUT/run_all.json`` (every number, the load average, versions) and ``OUT/run_all.md``
(the table in ``docs/benchmarks.md``).

    python benchmarks/run_all.py            # full run, ~10 minutes on one core
    python benchmarks/run_all.py --quick    # seconds: a smoke test of every case
    python benchmarks/run_all.py --only vae lae --sizes mnist

One torch thread by default: thread CPU time is then the whole cost of a step, and the
machine's other cores cannot blur the comparison.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).parent))

import floors  # noqa: E402
from harness import interleave, load_average  # noqa: E402

from pyro_lvm.experiments.build import build_experiment  # noqa: E402
from pyro_lvm.experiments.config import TrainConfig  # noqa: E402
from pyro_lvm.infer import (  # noqa: E402
    LAE,
    VIMCO,
    ModuleSVI,
    TraceNVIL_ELBO,
    ais_log_likelihood,
    iwae_log_likelihood,
)
from pyro_lvm.models import VAE, LangevinAutoencoder, SigmoidBeliefNet  # noqa: E402

#: (data_dim, hidden_dim, latent_dim, batch): the CLI's digits networks and MNIST size
SIZES = {"digits": (64, 256, 8, 100), "mnist": (784, 256, 16, 100)}
#: the scaling sweep (``--sizes scaling``): MNIST size over batch 32-1024 and width
#: 256-1024; LAE's rank condition needs the width at least the batch, hence 1024 x 1024
SCALING = {
    "mnist-b32": (784, 256, 16, 32),
    "mnist-b256": (784, 256, 16, 256),
    "mnist-w512": (784, 512, 16, 100),
    "mnist-w1024": (784, 1024, 16, 100),
    "mnist-w1024-b1024": (784, 1024, 16, 1024),
}
SIZES.update(SCALING)
CASES = ("vae", "lae", "iwae", "ais", "nvil", "vimco", "cli")
LR = 1e-3


def _data(data_dim: int, batch: int) -> torch.Tensor:
    return torch.bernoulli(torch.full((batch, data_dim), 0.3))


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(list(params), lr=LR)


def _compiled(quick: bool) -> str:
    """The compiled variants' backend: Inductor; a quick run (a smoke test) replays the
    captured graphs without compiling them."""
    return "fx" if quick else "inductor"


def _no_validation(fn: Callable[[], object]) -> Callable[[], object]:
    def step():
        with pyro.validation_enabled(False):
            return fn()

    return step


def case_vae(size, quick):
    d, h, z, b = size
    x = _data(d, b)
    vae = VAE(d, z, hidden_dim=h)
    vae_off, vae_jit, ref = copy.deepcopy(vae), copy.deepcopy(vae), copy.deepcopy(vae)
    vae_fx = copy.deepcopy(vae)
    svi = ModuleSVI(vae.model, vae.guide, _adam(vae.parameters()))
    svi_off = ModuleSVI(vae_off.model, vae_off.guide, _adam(vae_off.parameters()))
    svi_jit = ModuleSVI(
        vae_jit.model, vae_jit.guide, _adam(vae_jit.parameters()), jit_compile=_compiled(quick)
    )
    svi_fx = ModuleSVI(vae_fx.model, vae_fx.guide, _adam(vae_fx.parameters()), jit_compile="fx")
    opt = _adam(ref.parameters())
    return {
        "torch": lambda: floors.vae_step(ref.encoder, ref.decoder, opt, x),
        "pyro_lvm": lambda: svi.step(x),
        "pyro_lvm (validation off)": _no_validation(lambda: svi_off.step(x)),
        "pyro_lvm (jit_compile)": lambda: svi_jit.step(x),
        "pyro_lvm (jit_compile='fx')": lambda: svi_fx.step(x),
    }, {}


def case_lae(size, quick):
    d, h, z, b = size
    x = _data(d, b)
    lvm = LangevinAutoencoder(d, z, hidden_dim=h)
    ref, lvm_jit, lvm_fx = copy.deepcopy(lvm), copy.deepcopy(lvm), copy.deepcopy(lvm)
    lae = LAE(lvm.model, lvm.encoder, _adam(lvm.parameters()), num_steps=2)
    lae_jit = LAE(
        lvm_jit.model,
        lvm_jit.encoder,
        _adam(lvm_jit.parameters()),
        num_steps=2,
        jit_compile=_compiled(quick),
    )
    lae_fx = LAE(
        lvm_fx.model, lvm_fx.encoder, _adam(lvm_fx.parameters()), num_steps=2, jit_compile="fx"
    )
    chain = ref.encoder[-1].weight
    opt = _adam(p for p in ref.parameters() if p is not chain)
    floor = floors.LAEStep(ref.encoder, ref.decoder, opt, num_steps=2)
    return {
        "torch": lambda: floor(x),
        "pyro_lvm": lambda: lae.step(x),
        "pyro_lvm (jit_compile)": lambda: lae_jit.step(x),
        "pyro_lvm (jit_compile='fx')": lambda: lae_fx.step(x),
    }, {"num_steps": 2}


def case_iwae(size, quick):
    d, h, z, b = size
    x = _data(d, b)
    vae = VAE(d, z, hidden_dim=h)
    k = 20 if quick else 200
    return {
        "torch": lambda: floors.iwae(vae.encoder, vae.decoder, x, k).sum().item(),
        "pyro_lvm": lambda: (
            iwae_log_likelihood(vae.model, vae.guide, x, num_samples=k).sum().item()
        ),
    }, {"num_samples": k}


def case_ais(size, quick):
    d, h, z, b = size
    x = _data(d, b)
    vae = VAE(d, z, hidden_dim=h)
    steps, chains = (10, 2) if quick else (100, 4)
    return {
        "torch": lambda: (
            floors.ais(vae.decoder, x, z, num_steps=steps, num_chains=chains).sum().item()
        ),
        "pyro_lvm": lambda: (
            ais_log_likelihood(vae.model, x, num_steps=steps, num_chains=chains).sum().item()
        ),
    }, {"num_steps": steps, "num_chains": chains}


def _sbn(size):
    d, _, _, b = size
    x = _data(d, b)
    sbn = SigmoidBeliefNet(d, latent_dim=200, num_layers=1)
    return x, sbn


def case_nvil(size, quick):
    x, sbn = _sbn(size)
    cached, ref = copy.deepcopy(sbn), copy.deepcopy(sbn)
    svi = ModuleSVI(sbn.model, sbn.guide, _adam(sbn.parameters()), loss=TraceNVIL_ELBO())
    svi_cached = ModuleSVI(
        cached.model,
        cached.guide,
        _adam(cached.parameters()),
        loss=TraceNVIL_ELBO(cache_dependencies=True),
    )
    opt = _adam(ref.parameters())
    return {
        "torch": lambda: floors.sf_step(ref.encoders[0], ref.decoder, ref.prior_logits, opt, x),
        "pyro_lvm": lambda: svi.step(x),
        "pyro_lvm (cache_dependencies)": lambda: svi_cached.step(x),
    }, {"network": f"{x.shape[1]}-200 linear SBN"}


def case_vimco(size, quick):
    x, sbn = _sbn(size)
    ref = copy.deepcopy(sbn)
    k = 5
    svi = ModuleSVI(
        sbn.model,
        sbn.guide,
        _adam(sbn.parameters()),
        loss=VIMCO(num_particles=k, vectorize_particles=True),
    )
    opt = _adam(ref.parameters())
    return {
        "torch": lambda: floors.vimco_step(
            ref.encoders[0], ref.decoder, ref.prior_logits, opt, x, k
        ),
        "pyro_lvm": lambda: svi.step(x),
    }, {"network": f"{x.shape[1]}-200 linear SBN", "num_particles": k}


def _cli_inference(model: str, data_dim: int, size, jit) -> object:
    """The inference object ``pyro-lvm train MODEL`` builds (the CLI's defaults: the VAE
    with the analytic KL, LAE with centred features, the Jacobian correction and
    projected noise), at this size's networks."""
    _, h, z, b = size
    config = TrainConfig(model=model, hidden_dim=h, latent_dim=z, batch_size=b, jit_compile=jit)
    validation = pyro.poutine.util.is_validation_enabled()
    try:
        return build_experiment(config, data_dim).inference
    finally:  # the CLI turns Pyro's validation off (it checks the data once): restore it
        pyro.enable_validation(validation)


def case_cli(size, quick):
    """The CLI's VAE and LAE steps, eager and compiled, against each other and against the
    hand-written floors (ratios to the CLI's compiled VAE step)."""
    d, h, z, b = size
    x = _data(d, b)
    vae = VAE(d, z, hidden_dim=h)
    lvm = LangevinAutoencoder(d, z, hidden_dim=h)
    vae_opt = _adam(vae.parameters())
    chain = lvm.encoder[-1].weight
    floor_lae = floors.LAEStep(
        lvm.encoder, lvm.decoder, _adam(p for p in lvm.parameters() if p is not chain)
    )
    steps = {
        "torch": lambda: floors.vae_step(vae.encoder, vae.decoder, vae_opt, x),
        "torch LAE (T=2, no centring)": lambda: floor_lae(x),
    }
    for jit in (_compiled(quick), False):
        label = "compiled" if jit else "eager"
        for model in ("vae", "lae"):
            inference = _cli_inference(model, d, size, jit)
            steps[f"CLI {model.upper()} ({label})"] = lambda i=inference: i.step(x)
    return steps, {"baseline": "CLI VAE (compiled)"}


BUILDERS = {
    "vae": case_vae,
    "lae": case_lae,
    "iwae": case_iwae,
    "ais": case_ais,
    "nvil": case_nvil,
    "vimco": case_vimco,
    "cli": case_cli,
}
#: (steps, repeats) per case in a full run: evaluation "steps" are whole evaluations
BUDGET = {
    "vae": (40, 7),
    "lae": (30, 7),
    "iwae": (5, 5),
    "ais": (2, 5),
    "nvil": (30, 7),
    "cli": (20, 7),
}
BUDGET["vimco"] = BUDGET["nvil"]


def run(cases, sizes, quick: bool, seed: int = 0) -> dict:
    rows = []
    load_before = load_average()
    t0 = time.perf_counter()
    for name in cases:
        for size_name in sizes:
            torch.manual_seed(seed)
            pyro.set_rng_seed(seed)
            size = SIZES[size_name]
            variants, extra = BUILDERS[name](size, quick)
            steps, repeats = (2, 2) if quick else BUDGET[name]
            baseline = extra.pop("baseline", "torch")
            result = interleave(
                variants, baseline=baseline, steps=steps, repeats=repeats, warmup=1 if quick else 3
            )
            d, h, z, b = size
            rows.append(
                {
                    "case": name,
                    "size": size_name,
                    "network": extra.pop("network", f"{d}-{h}-{z} MLP"),
                    "batch": b,
                    "steps": steps,
                    "repeats": repeats,
                    "options": extra,
                    "baseline": baseline,
                    **result,
                }
            )
    return {
        "meta": {
            "quick": quick,
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "seconds": time.perf_counter() - t0,
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "rows": rows,
    }


def _fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"Measured {meta['date']}, torch {meta['torch']}, pyro {meta['pyro']}, "
        f"{meta['threads']} torch thread(s), load average {meta['load_average_before']:.2f} "
        f"before / {meta['load_average_after']:.2f} after"
        + (" (quick run: not for quoting)" if meta["quick"] else "")
        + ".",
        "",
        "| case | size | variant | CPU ms/step | ratio (CPU) | ratio (wall) |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        size = f"{row['size']} {row['network']}, B={row['batch']}"
        if row.get("baseline", "torch") != "torch":
            size += f" (ratios to {row['baseline']})"
        for name, timing in row["variants"].items():
            ratio = row["ratios"].get(name)
            cpu_ratio = _fmt(ratio["cpu"]) if ratio else "1"
            wall_ratio = _fmt(ratio["wall"]) if ratio else "1"
            lines.append(
                f"| {row['case']} | {size} | {name} | {_fmt(timing['cpu_ms'])} | "
                f"{cpu_ratio} | {wall_ratio} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    parser.add_argument("--only", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--sizes", nargs="+", choices=[*SIZES, "scaling"], default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    sizes = args.sizes or (["digits"] if args.quick else ["digits", "mnist"])
    if "scaling" in sizes:
        sizes = [n for n in sizes if n != "scaling"] + list(SCALING)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run(args.only, sizes, args.quick, args.seed)
    finally:
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "run_all" + ("_quick" if args.quick else "")
    if list(args.only) != list(CASES):  # a partial run never overwrites the full results
        stem += "_" + "-".join(args.only)
    if args.sizes and set(sizes) == set(SCALING):
        stem += "_scaling"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / f"{stem}.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
