"""The ten user models of ``tests/infer/test_compile.py``, compiled against eager: a table.

Each model (written as a researcher would: a branch on the data, an annealed KL weight,
a noise scale read with ``float()``, dropout then ``eval()``, Python's ``random``, a buffer
updated in place, a mutated NumPy argument, ``svi.step`` inside ``poutine.scale``, and
the branch again under ``LAE`` and ``JitTrace_ELBO``) trains a few steps eagerly and with
``jit_compile`` on the same random numbers; the table shows both runs' losses, the
largest relative difference and the one-line warning of the compiled run, if any.
``--backend inductor`` compiles the kernels (minutes: one compile per graph);
``fx`` (the default) replays the captured graphs, with the same capture and guards::

    python benchmarks/compile_cases.py [--backend fx|inductor]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "infer"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_compile as cases  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import JitTrace_ELBO, Trace_ELBO  # noqa: E402

from pyro_lvm.infer import LAE  # noqa: E402
from pyro_lvm.infer.compile import CompileWarning  # noqa: E402


def _lae_branch(backend: str):
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(
        torch.nn.Linear(cases.Z, cases.H), torch.nn.Tanh(), torch.nn.Linear(cases.H, cases.D)
    )
    encoder = torch.nn.Sequential(
        torch.nn.Linear(cases.D, 16), torch.nn.Tanh(), torch.nn.Linear(16, cases.Z)
    )
    losses, messages = {}, []
    import copy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileWarning)
        for name, jit in (("eager", False), ("compiled", backend)):
            dec, enc = copy.deepcopy(decoder), copy.deepcopy(encoder)
            lae = LAE(
                cases._branch_lae_model(dec),
                enc,
                torch.optim.Adam([*dec.parameters(), *enc.parameters()], lr=0.01),
                step_size=1e-3,
                jit_compile=jit,
            )
            losses[name] = []
            for step, (x,) in enumerate(cases._batches()):
                torch.manual_seed(step)
                losses[name].append(lae.step(x))
    messages = [str(w.message) for w in caught if issubclass(w.category, CompileWarning)]
    return losses, messages


def _svi(make, backend, steps=4, **options):
    loss, jit_loss = options.pop("loss", Trace_ELBO), options.pop("jit_loss", None)
    pair = cases._svi_pair(make, loss=loss, jit_loss=jit_loss, jit_compile=backend)
    batches = options.pop("batches", None) or cases._batches(steps)
    return cases._steps(pair, batches, **options)


def run(backend: str) -> list[dict]:
    weights = cases.np.ones(cases.D, dtype=cases.np.float32)

    def reweight(model, step):
        if model.__class__ is cases.WeightedVAE and step > 0:
            weights[step % cases.D] = 0.5 + step

    def anneal(model, step):
        model.beta = min(1.0, 0.1 + 0.2 * step)

    def cool(model, step):
        model.temperature.fill_(1.0 + step)

    x = cases._data(10)
    table = {
        "1 branch on x.mean()": lambda: _svi(cases.BranchVAE, backend),
        "2 KL annealing (self.beta)": lambda: _svi(
            cases.AnnealedVAE, backend, steps=6, before_step=anneal
        ),
        "3 noise scale float(x.std())": lambda: _svi(cases.NoiseScaleModel, backend),
        "4 dropout (training)": lambda: _svi(cases.DropoutVAE, backend),
        "5 Python random augmentation": lambda: _svi(cases.AugmentedVAE, backend),
        "6 buffer filled between steps": lambda: _svi(
            cases.TemperedVAE, backend, before_step=cool
        ),
        "6' buffer updated by the model": lambda: _svi(cases.RunningMeanVAE, backend),
        "7 NumPy argument mutated": lambda: _svi(
            cases.WeightedVAE, backend, batches=[(x, weights)] * 5, before_step=reweight
        ),
        "8 inside poutine.scale(0.01)": lambda: _svi(
            cases.UserVAE, backend, steps=2, wrap=lambda: poutine.scale(scale=0.01)
        ),
        "9 LAE on the branch": lambda: _lae_branch(backend),
        "10 JitTrace_ELBO on the branch": lambda: _svi(
            cases.BranchVAE, backend, jit_loss=JitTrace_ELBO
        ),
    }
    rows = []
    for name, case in table.items():
        torch.manual_seed(0)
        losses, messages = case()
        eager, compiled = losses["eager"], losses["compiled"]
        rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager, compiled))
        rows.append(
            {
                "case": name,
                "eager": eager,
                "compiled": compiled,
                "max_rel_diff": rel,
                "warning": messages[0] if messages else None,
            }
        )
        print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    fmt = ", ".join
    warning = row["warning"] or "compiled"
    return (
        f"| {row['case']} | {fmt(f'{v:.4f}' for v in row['eager'])} | "
        f"{fmt(f'{v:.4f}' for v in row['compiled'])} | {row['max_rel_diff']:.1e} | {warning} |"
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="fx", choices=["fx", "inductor"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| case | eager losses | compiled losses | max rel. diff | compiled run |")
    print("|---|---|---|---|---|")
    rows = run(args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compile_cases_{args.backend}.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
