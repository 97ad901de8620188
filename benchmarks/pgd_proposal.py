"""Which proposal lets ``test_nll`` judge a PGD-trained decoder (test data have no particles).

For a trained ``pyro-lvm train pgd`` run: the importance-weighted bound on the test split
with Gaussian proposals fitted to MALA chains (8 per test datapoint, half warmup) that
start

- ``prior``: at prior draws (one per chain), ``--prior-steps`` MALA steps;
- ``map``: at the datapoint's best of 8 MAP ascents from prior draws (100 Adam steps),
  ``--map-steps`` MALA steps (the recipe's :func:`pyro_lvm.infer.map_langevin_proposal`),

beside the run's AIS estimate (``metrics.json``), which needs no proposal. A bound far
above AIS is the proposal's fault, not the decoder's. Prints a table and writes
``benchmarks/results/pgd_proposal.json``.

    python benchmarks/pgd_proposal.py RUN_DIR [--prior-steps 20 300] [--map-steps 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pyro_lvm import load_run
from pyro_lvm.data import load_dataset
from pyro_lvm.experiments.evaluation import evaluate
from pyro_lvm.infer import LangevinProposalGuide, map_langevin_proposal
from pyro_lvm.infer.pgd import PriorDraws
from pyro_lvm.models.likelihoods import LIKELIHOODS


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prior-steps", type=int, nargs="+", default=[20, 300])
    parser.add_argument("--map-steps", type=int, nargs="+", default=[20])
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = load_run(args.run_dir)
    data = load_dataset(run.config.dataset, run.config.data_dir)
    test_x = data.for_likelihood(LIKELIHOODS[run.config.likelihood]).test_x
    experiment, model = run.experiment, run.experiment.lvm.model
    target = run.config.target_accept_prob
    proposals = [
        (f"prior, {s} MALA steps", LangevinProposalGuide(model, PriorDraws(model, 8), s))
        for s in args.prior_steps
    ] + [
        (f"map, {s} MALA steps", map_langevin_proposal(model, s, target_accept_prob=target))
        for s in args.map_steps
    ]
    rows = []
    for name, proposal in proposals:
        experiment.eval_guide = proposal
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        out = evaluate(experiment, test_x, eval_samples=args.eval_samples)
        rows.append(
            {
                "proposal": name,
                "test_nelbo": out["test_nelbo"],
                "test_nll": out["test_nll"],
                "seconds": time.perf_counter() - start,
            }
        )
    ais = run.metrics.get("test_nll_ais")
    print(f"{args.run_dir} (test_nll_ais {ais})")
    print("| proposal | test_nelbo | test_nll | seconds |\n|---|---|---|---|")
    for r in rows:
        values = f"{r['test_nelbo']:.2f} | {r['test_nll']:.2f} | {r['seconds']:.0f}"
        print(f"| {r['proposal']} | {values} |")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"run_dir": str(args.run_dir), "test_nll_ais": ais, "rows": rows}
    (args.out / "pgd_proposal.json").write_text(json.dumps(result, indent=1))
    return rows


if __name__ == "__main__":
    main()
