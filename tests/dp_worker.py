"""Worker of tests/test_distributed.py: train one case for a few steps, save the state.

``python tests/dp_worker.py CASE[,CASE...] OUT --devices N`` launches N CPU processes with
Lightning Fabric (gloo); each writes ``OUT/{case}_rank{r}.pt``. The test runs
:func:`train` in its own process (``collective=None``) as the single-process reference on
the union batches.

Cases
-----
map : a linear-Gaussian model with a point-mass (Delta) guide under ModuleSVI: the loss
    and its gradient are deterministic, so a data-parallel run must equal one process
    on the union batches to float accuracy (this checks the gradient-sum scale).
vae : the ``vae`` recipe (random guide noise, dynamic binarization): ranks must agree.
nvil : the ``sbn`` recipe with NVIL baselines (running average, neural baseline, signal
    normalisation): parameters and baseline buffers must agree across ranks.
lae : the ``lae`` recipe (ALD chain, feature centring): the whole state and every accept
    decision must equal one process on the union batches.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro import distributions as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # seeding, as under pytest

from seeding import offset_seed  # noqa: E402

from pyro_lvm.data import DataBundle  # noqa: E402
from pyro_lvm.experiments.build import build_experiment  # noqa: E402
from pyro_lvm.experiments.config import TrainConfig  # noqa: E402
from pyro_lvm.experiments.recipes import Experiment  # noqa: E402
from pyro_lvm.experiments.trainer import Trainer  # noqa: E402
from pyro_lvm.infer import ModuleSVI  # noqa: E402

STEPS = int(__import__("os").environ.get("DP_STEPS", 10))
BATCH = 20
DIM = 12


def _data(binary: bool) -> DataBundle:
    g = torch.Generator().manual_seed(offset_seed(40))
    x = torch.rand(STEPS * BATCH, DIM, generator=g)
    if not binary:
        x = torch.randn(STEPS * BATCH, DIM, generator=g)
    return DataBundle("toy", x, x[:BATCH].clone(), binary_probs=binary)


class _MapModel(nn.Module):
    """x = W z + noise, z ~ N(0, I), guide z = A x (a point mass): deterministic ELBO."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(offset_seed(41))
        self.decoder = nn.Linear(3, DIM)
        self.encoder = nn.Linear(DIM, 3)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 3]).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.encoder(x)).to_event(1))


def _experiment(case: str, data: DataBundle) -> Experiment:
    pyro.clear_param_store()
    if case == "map":
        lvm = _MapModel()
        optim = torch.optim.Adam(lvm.parameters(), lr=1e-2)
        return Experiment(lvm=lvm, inference=ModuleSVI(lvm.model, lvm.guide, optim), modules=lvm)
    settings = dict(latent_dim=3, hidden_dim=32, batch_size=BATCH, seed=offset_seed(42), lr=1e-2)
    if case == "vae":
        config = TrainConfig(model="vae", **settings)
    elif case == "nvil":
        config = TrainConfig(model="sbn", estimator="nvil", **settings)
    elif case == "lae":
        config = TrainConfig(model="lae", num_steps=2, **settings)
    else:
        raise ValueError(f"unknown case {case!r}")
    pyro.set_rng_seed(config.seed)  # the same initial weights in every process
    return build_experiment(config, data.data_dim)


def train(case: str, collective=None) -> dict:
    """Train ``case`` for :data:`STEPS` steps; returns the state to compare.

    Double precision: the MH test compares potentials of order 1e3, whose float32 sums
    differ with the order of addition by about 1e-4, and the chain amplifies any
    difference; in float64 the data-parallel and single runs agree to ~1e-10.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _train(case, collective)
    finally:
        torch.set_default_dtype(previous)


def _train(case: str, collective) -> dict:
    data = _data(binary=case != "map")
    experiment = _experiment(case, data)
    accepted = []
    if getattr(experiment.inference, "kernel", None) is not None:  # every accept decision
        from pyro_lvm.infer.mcmc import ald

        transition = ald.ald_transition

        def recorded(*args, **kw):
            state, info = transition(*args, **kw)
            accepted.append(bool(info.accepted))
            return state, info

        ald.ald_transition = recorded
    seed = offset_seed(43)
    trainer = Trainer(experiment, data, BATCH, None, seed, collective=collective)
    torch.manual_seed(seed)  # the global stream (binarization, chain noise)
    t0 = time.perf_counter()
    trainer.fit(1)
    seconds = time.perf_counter() - t0
    return {
        "modules": {k: v.clone() for k, v in experiment.modules.state_dict().items()},
        "inference": experiment.inference.state_dict(),
        "losses": [r["loss"] for r in trainer.state.steps],
        "accepted": accepted,
        "steps": trainer.state.step,
        "seconds_per_step": seconds / trainer.state.step,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case")
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from pyro_lvm.experiments.fabric import launch

    config = TrainConfig(devices=args.devices, batch_size=BATCH)
    collective = launch(config)
    rank = 0 if collective is None else collective.rank
    for case in args.case.split(","):
        result = train(case, collective)
        result["world_size"] = 1 if collective is None else collective.world_size
        torch.save(result, Path(args.out) / f"{case}_rank{rank}.pt")


if __name__ == "__main__":
    main()
