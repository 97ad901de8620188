"""LAE against SVI on Pyro's deep Markov model: does LAE training collapse, and why.

Trains the DMM port (``tests/outside_models/dmm.py``: Pyro's ``examples/dmm.py`` on
synthetic binary sequences, ragged by default) with SVI (the example's guide,
``Trace_ELBO``) and with :class:`~pyro_lvm.infer.LAE` in several variants, on the same
data and initial networks per seed, then estimates :math:`\\log p(x)` of every test
sequence by AIS (:func:`~pyro_lvm.infer.ais_log_likelihood`, which needs no encoder, so it
judges every decoder alike). LAE's encoder is the guide's own trunk (the RNN over the
reversed sequence and the combiner's hidden state) with one final ``nn.Linear`` for every
``z_t`` (``tests/outside_models/wrappers.py: DMMEncoder``), the chain is that layer's
weight.

Variants (``--variants``):

``svi``                 the example's SVI
``lae``                 LAE with the library's defaults (the trunk's gradient corrected
                        for the Jacobian of the chain layer, ``jacobian=True``)
``lae-no-jacobian``     ... without that correction (the default before it)
``lae-project-noise``   ... with ``project_noise=True``
``lae-frozen-trunk``    ... with the trunk's learning rate 0 (random features)
``lae-frozen-center-proj`` ... and centred features and ``project_noise=True``
``lae-precondition``    ... with ``precondition=1e-3`` (``jacobian=False``: it does not apply)
``lae-center``          ... with a :class:`~pyro_lvm.models.centering.FeatureCentering`
                        layer before the head (running mean, updates absorbed)
``lae-center-proj``     ... and ``project_noise=True`` (the digits recipe's defaults)
``lae-onehot``          per-sequence persistent chains: features :math:`e_i` (one-hot
                        sequence index), no trunk, projected noise: plain Langevin
                        dynamics, the non-amortized reference

Every ``--log-every`` steps the trajectory records the chain's step size, acceptance and
RMS move, the median and smallest transition scale :math:`\\sigma` of
:math:`p(z_t \\mid z_{t-1})` along the batch's latents, the eigenvalues of
:math:`G G^\\top` (the batch's features: largest, median), the largest eigenvalue of the
potential's Hessian in the latents (power iteration), the largest :math:`|z|` of a
masked (padding) latent, and :math:`\\log p(z)`, :math:`\\log p(x \\mid z)` per real time
step at the chain's latents.

    python benchmarks/dmm_lae.py [--steps 2000] [--seeds 0 1 2] [--variants svi lae ...]

``--fixed-transition-scale S`` is a mechanism check, not a fix: it replaces the learned
scale of :math:`p(z_t \\mid z_{t-1})` by ``S`` (a different model), to see whether LAE
still collapses when the prior's scale cannot shrink.

Prints a table (AIS per test sequence, mean and standard error; the paired difference to
SVI) and writes JSON to ``benchmarks/results/dmm_lae.json``. Run on a shared CPU; the
numbers are seeded, the times are not.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from outside_models import dmm as D  # noqa: E402
from outside_models.wrappers import DictEncoder, DMMEncoder, dmm_encoder_input  # noqa: E402

from pyro_lvm.infer import LAE, DivergenceError, ais_log_likelihood  # noqa: E402
from pyro_lvm.models.centering import FeatureCentering  # noqa: E402

VARIANTS = [
    "svi",
    "lae",
    "lae-no-jacobian",
    "lae-project-noise",
    "lae-frozen-trunk",
    "lae-frozen-center-proj",
    "lae-precondition",
    "lae-center",
    "lae-center-proj",
    "lae-onehot",
]


class CenteredDMMEncoder(DMMEncoder):
    """:class:`DMMEncoder` with a :class:`FeatureCentering` layer before the head."""

    def __init__(self, dmm: D.DMM, T_max: int):
        super().__init__(dmm, T_max)
        self.center = FeatureCentering(self.head.in_features)
        self.center.compensate(self.head)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.center(super().features(x))


def fix_transition_scale(dmm: D.DMM, scale: float) -> None:
    """Mechanism check (changes the model): ``p(z_t | z_{t-1})`` with a fixed scale."""
    forward = dmm.trans.forward
    dmm.trans.forward = lambda z: (forward(z)[0], torch.full_like(z, scale))


def sites(T: int) -> list[str]:
    return [f"z_{t}" for t in range(1, T + 1)]


def trunk_parameters(dmm: D.DMM) -> list[nn.Parameter]:
    """The guide's parameters that LAE's encoder uses before its head."""
    return [*dmm.rnn.parameters(), dmm.h_0, dmm.z_q_0, *dmm.combiner.lin_z_to_hidden.parameters()]


class Run:
    """One training run: the DMM, its trainer, and how to read its latents."""

    def __init__(self, variant: str, args, seed: int, num_train: int):
        pyro.clear_param_store()
        torch.manual_seed(seed)
        self.variant, self.args = variant, args
        self.dmm = D.DMM(
            input_dim=args.input_dim,
            z_dim=args.z_dim,
            emission_dim=args.emission_dim,
            transition_dim=args.transition_dim,
            rnn_dim=args.rnn_dim,
        )
        if args.fixed_transition_scale is not None:
            fix_transition_scale(self.dmm, args.fixed_transition_scale)
        T = args.T
        self.onehot = variant == "lae-onehot"
        if variant == "svi":
            self.encoder = None
            optim = pyro.optim.Adam({"lr": args.lr})
            self.svi = SVI(self.dmm.model, self.dmm.guide, optim, loss=Trace_ELBO())
            return
        kernel = {}
        if variant == "lae-onehot":
            self.encoder = DictEncoder(
                nn.Identity(), num_train, dict.fromkeys(sites(T), args.z_dim)
            )
            kernel["project_noise"] = True
        elif "center" in variant:
            self.encoder = CenteredDMMEncoder(self.dmm, T)
            kernel["project_noise"] = variant.endswith("proj")
        else:
            self.encoder = DMMEncoder(self.dmm, T)
        if variant == "lae-precondition":  # the correction does not apply to this chain
            kernel["precondition"], kernel["jacobian"] = 1e-3, False
        if variant == "lae-no-jacobian":
            kernel["jacobian"] = False
        if variant == "lae-project-noise":
            kernel["project_noise"] = True
        trunk = {id(p) for p in trunk_parameters(self.dmm)}
        params = list(dict.fromkeys([*self.dmm.parameters(), *self.encoder.parameters()]))
        groups = [
            {"params": [p for p in params if id(p) not in trunk]},
            {
                "params": [p for p in params if id(p) in trunk],
                "lr": 0.0 if variant.startswith("lae-frozen") else args.lr,
            },
        ]
        optim = torch.optim.Adam(groups, lr=args.lr)
        self.lae = LAE(
            self.model_with_index if self.onehot else self.dmm.model,
            self.encoder,
            optim,
            num_steps=args.langevin_steps,
            latent_site=sites(T),
            encoder_input=self.onehot_input if self.onehot else dmm_encoder_input,
            **kernel,
        )
        self.num_train = num_train

    # the one-hot variant needs the sequence indices: an extra first model argument
    def model_with_index(self, index, *batch, **kwargs):
        return self.dmm.model(*batch, **kwargs)

    def onehot_input(self, index, *batch, **kwargs):
        return nn.functional.one_hot(index, self.num_train).to(torch.get_default_dtype())

    def step(self, index: torch.Tensor, batch: tuple) -> float:
        if self.variant == "svi":
            return self.svi.step(*batch)
        return self.lae.step(index, *batch) if self.onehot else self.lae.step(*batch)

    def latents(self, index: torch.Tensor, batch: tuple) -> dict[str, torch.Tensor]:
        """The latents the training uses on this batch: a guide draw (SVI) or the
        encoder's output at the chain's state (LAE)."""
        with torch.no_grad():
            if self.variant == "svi":
                trace = poutine.trace(self.dmm.guide).get_trace(*batch)
                return {s: trace.nodes[s]["value"] for s in sites(self.args.T)}
            x = self.onehot_input(index) if self.onehot else dmm_encoder_input(*batch)
            was = self.encoder.training
            self.encoder.eval()  # no centring statistics update from a diagnostic
            out = self.encoder(x)
            self.encoder.train(was)
            return out

    def features(self, index: torch.Tensor, batch: tuple) -> torch.Tensor | None:
        if self.encoder is None:
            return None
        with torch.no_grad():
            if self.onehot:
                return self.onehot_input(index)
            was = self.encoder.training
            self.encoder.eval()
            g = self.encoder.features(dmm_encoder_input(*batch))
            self.encoder.train(was)
            return g


def hessian_max_eig(model, batch, z: dict[str, torch.Tensor], iters: int = 30) -> float:
    """Largest eigenvalue of the Hessian of the potential in the latents (power iteration)."""
    u = {k: v.detach().clone().requires_grad_(True) for k, v in z.items()}

    def potential():
        trace = poutine.trace(poutine.condition(model, data=u)).get_trace(*batch)
        return -trace.log_prob_sum()

    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(w.shape, generator=gen) for w in u.values()]
    lam = float("nan")
    with poutine.block():
        for _ in range(iters):
            g = torch.autograd.grad(potential(), list(u.values()), create_graph=True)
            hv = torch.autograd.grad(g, list(u.values()), grad_outputs=v)
            norm = torch.sqrt(sum((h**2).sum() for h in hv))
            lam = float(norm / torch.sqrt(sum((w**2).sum() for w in v)))
            v = [h.detach() / norm for h in hv]
    return lam


def diagnostics(run: Run, index: torch.Tensor, batch: tuple) -> dict:
    args, dmm = run.args, run.dmm
    mask = batch[2].bool()
    z = run.latents(index, batch)
    out = {}
    with torch.no_grad(), poutine.block():
        z_prev = dmm.z_0.expand(mask.shape[0], -1)
        scales, padding = [], []
        for t, name in enumerate(sites(args.T)):
            _, scale = dmm.trans(z_prev)
            scales.append(scale[mask[:, t]])
            padding.append(z[name][~mask[:, t]].abs().reshape(-1))
            z_prev = z[name]
        scales, padding = torch.cat(scales), torch.cat(padding)
        trace = poutine.trace(poutine.condition(dmm.model, data=z)).get_trace(*batch)
        trace.compute_log_prob()
        real = float(mask.sum())
        out["log_pz"] = float(sum(trace.nodes[s]["log_prob_sum"] for s in sites(args.T))) / real
        obs = [f"obs_x_{t}" for t in range(1, args.T + 1)]
        out["log_px_given_z"] = float(sum(trace.nodes[s]["log_prob_sum"] for s in obs)) / real
    out["sigma_median"], out["sigma_min"] = float(scales.median()), float(scales.min())
    out["padding_abs_max"] = float(padding.max()) if padding.numel() else 0.0
    g = run.features(index, batch)
    if g is not None:
        eig = torch.linalg.eigvalsh((g @ g.T).double())
        out["gram_eig_max"], out["gram_eig_median"] = float(eig[-1]), float(eig.median())
    out["hessian_z_max"] = hessian_max_eig(dmm.model, batch, z, iters=args.hessian_iters)
    if run.variant != "svi":
        out.update(run.lae.metrics())
    return out


def train(
    variant: str, args, seed: int, sequences, lengths
) -> tuple[Run, list[dict], float, str | None]:
    """Train one variant; the run, its trajectory, seconds, and why it stopped early
    (``None`` if it did not)."""
    run = Run(variant, args, seed, len(sequences))
    gen = torch.Generator().manual_seed(seed)  # the same minibatches for every variant
    history, start = [], time.perf_counter()
    for step in range(args.steps + 1):
        index = torch.randperm(len(sequences), generator=gen)[: args.batch_size]
        batch = D.get_mini_batch(index, sequences, lengths)
        # get_mini_batch sorts the rows by length: the same order for the indices
        index = index[torch.sort(lengths[index]).indices.flip(0)]
        if step % args.log_every == 0:
            history.append({"step": step, **diagnostics(run, index, batch)})
        if step < args.steps:
            try:
                loss = run.step(index, batch)
            except DivergenceError as err:  # recorded as the run's outcome, not raised
                return run, history, time.perf_counter() - start, f"step {step}: {err}"
            if not math.isfinite(loss):
                return run, history, time.perf_counter() - start, f"step {step}: loss {loss}"
    return run, history, time.perf_counter() - start, None


def evaluate(run: Run, args, test_batch, seed: int) -> torch.Tensor:
    """AIS estimate of log p(x) per test sequence (the same AIS seed for every run)."""
    pyro.set_rng_seed(10_000 + seed)
    # validation off: a collapsed transition scale underflows to 0 at some AIS proposals,
    # which Pyro's validation turns into an error; without it the potential is not finite
    # there and the proposal is rejected (what the ALD potential does too)
    with pyro.validation_enabled(False):
        return ais_log_likelihood(
            run.dmm.model, *test_batch, num_steps=args.ais_steps, num_chains=args.ais_chains
        ).detach()


def _fmt(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (
        f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, "
        f"{max(values):.{digits}f}]"
    )


def make_table(rows: list[dict], args) -> str:
    """The markdown table of ``rows`` (median [min, max] over the seeds present)."""
    seeds = sorted({r["seed"] for r in rows})
    variants = [v for v in args.variants if any(r["variant"] == v for r in rows)]
    lines = [
        f"DMM ({args.num_train} train / {args.num_test} test sequences, T = {args.T}, ragged "
        f"from length {args.min_length or args.T}), {args.steps} steps, batch "
        f"{args.batch_size}, Adam {args.lr}; AIS {args.ais_steps} steps x {args.ais_chains} "
        f"chains per test sequence; median [min, max] over seeds {seeds}",
        "",
        "| variant | AIS per sequence | minus SVI (paired) | final step size | sigma median "
        "| Hessian max | Gram median/max | padding max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        failed = [
            f"seed {r['seed']}: {r['error']}"
            for r in rows
            if r["variant"] == variant and "error" in r
        ]
        sel = [r for r in rows if r["variant"] == variant and "error" not in r]
        if not sel:
            lines.append(f"| {variant} | failed: {'; '.join(failed)} |")
            continue
        last = [r["history"][-1] for r in sel]
        gram = [h["gram_eig_median"] / h["gram_eig_max"] for h in last if "gram_eig_max" in h]
        lines.append(
            f"| {variant} | {_fmt([r['ais_mean'] for r in sel])} | "
            + (_fmt([r["minus_svi_mean"] for r in sel]) if "minus_svi_mean" in sel[0] else "-")
            + f" | {_fmt([h.get('step_size', float('nan')) for h in last], 7)} | "
            f"{_fmt([h['sigma_median'] for h in last], 3)} | "
            f"{_fmt([h['hessian_z_max'] for h in last], 1)} | "
            + (_fmt(gram, 6) if gram else "-")
            + f" | {_fmt([h['padding_abs_max'] for h in last], 1)} |"
        )
    table = "\n".join(lines)
    failures = [f"{r['variant']} seed {r['seed']}: {r['error']}" for r in rows if "error" in r]
    if failures:
        table += "\n\nStopped early (DivergenceError or a non-finite loss):\n" + "\n".join(
            f"- {f}" for f in failures
        )
    return table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--langevin-steps", type=int, default=2)
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-test", type=int, default=64)
    p.add_argument("--T", type=int, default=6)
    p.add_argument("--min-length", type=int, default=3, help="0: every sequence full length")
    p.add_argument("--input-dim", type=int, default=8)
    p.add_argument("--z-dim", type=int, default=4)
    p.add_argument("--emission-dim", type=int, default=16)
    p.add_argument("--transition-dim", type=int, default=16)
    p.add_argument("--rnn-dim", type=int, default=32)
    p.add_argument("--ais-steps", type=int, default=1000)
    p.add_argument("--ais-chains", type=int, default=16)
    p.add_argument(
        "--fixed-transition-scale",
        type=float,
        default=None,
        help="mechanism check: the transition's scale fixed to this value (a different model)",
    )
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--hessian-iters", type=int, default=30, help="power iterations")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "dmm_lae.json"))
    p.add_argument(
        "--table-from", default=None, help="print the table of an existing JSON (e.g. partial)"
    )
    args = p.parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        table = make_table(saved["rows"], argparse.Namespace(**saved["args"]))
        print(table)
        return {**saved, "table": table}
    torch.set_num_threads(1)
    min_length = args.min_length or None
    sequences, lengths = D.synthetic_sequences(
        args.num_train, args.T, args.input_dim, min_length=min_length, seed=0
    )
    test, test_lengths = D.synthetic_sequences(
        args.num_test, args.T, args.input_dim, min_length=min_length, seed=1
    )
    test_batch = D.get_mini_batch(torch.arange(args.num_test), test, test_lengths)
    rows, out = [], Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        ais = {}
        for variant in args.variants:
            run, history, seconds, failure = train(variant, args, seed, sequences, lengths)
            row = {"variant": variant, "seed": seed, "train_seconds": seconds}
            row["history"] = history
            if failure is not None:
                row["error"] = failure
            else:
                ais[variant] = evaluate(run, args, test_batch, seed)
                row["ais_mean"] = float(ais[variant].mean())
                row["ais_se"] = float(ais[variant].std() / math.sqrt(args.num_test))
                if "svi" in ais and variant != "svi":
                    diff = ais[variant] - ais["svi"]
                    row["minus_svi_mean"] = float(diff.mean())
                    row["minus_svi_se"] = float(diff.std() / math.sqrt(args.num_test))
            rows.append(row)
            last = history[-1]
            print(
                f"seed {seed} {variant:22s} AIS {row.get('ais_mean', float('nan')):8.3f} "
                f"+- {row.get('ais_se', float('nan')):.3f}"
                f"  - SVI {row.get('minus_svi_mean', float('nan')):7.3f}"
                f"  step {last.get('step_size', float('nan')):.2e}"
                f"  sigma {last['sigma_median']:.3f}  {seconds:.0f}s  {failure or ''}",
                flush=True,
            )
            # written after every run: a long benchmark interrupted keeps what it measured
            out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    table = make_table(rows, args)
    print(table)
    result = {"args": vars(args), "rows": rows, "table": table}
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
