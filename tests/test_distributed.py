"""Data parallelism: 2 CPU processes (Lightning Fabric, gloo) against one process.

The multi-process cases run once per module (``tests/dp_worker.py``, one launch for all
cases: process start-up dominates) and each test compares what the ranks saved with each
other and with the single-process run on the union batches, computed here in double
precision. Tolerances: the two runs add the same numbers in a different order, so they
differ by float64 rounding (relative ~1e-16 per operation) amplified over 10 steps;
1e-9 leaves a margin of more than three orders of magnitude above what was measured
(6e-13) while a wrong scale (mean instead of sum of gradients: a factor 2), an
unsynchronised rank or a different accept decision moves parameters by >1e-3.

The in-process tests run two *threads* as ranks of a :class:`ThreadCollective`, to check
the union-batch statistics exactly and cheaply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from seeding import offset_seed

from pyro_lvm.collective import (
    all_gather_cat,
    all_reduce_gradients,
    data_parallel,
    global_mean,
    shard_bounds,
)
from pyro_lvm.infer.baselines import BaselineContext, RunningAverageBaseline, SignalNormalization
from pyro_lvm.models.centering import FeatureCentering

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dp_worker.py"
CASES = ("map", "vae", "nvil", "lae")
TOL = 1e-9
# the LAE's projected proposal noise divides by the square roots of the union features'
# Gram eigenvalues (down to 1e-9 of the largest), which amplifies the float64 rounding
# differences of the shard-wise sums (up to 1/sqrt(1e-9) ~ 3e4-fold): measured 1.1e-9 in the
# weights and 2e-9 in the step size after 20 steps; the accept decisions stay equal
TOL_LAE = 1e-8


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("LOCAL_RANK", None)
    return env


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("dp")
    proc = subprocess.run(
        [sys.executable, str(WORKER), ",".join(CASES), str(out), "--devices", "2"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        case: [torch.load(out / f"{case}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        for case in CASES
    }


def _single(case: str) -> dict:
    sys.path.insert(0, str(WORKER.parent))
    import dp_worker

    return dp_worker.train(case)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diffs = [(a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()]
    return max(diffs)


def _moved(result: dict, case: str) -> float:
    """How far training moved the parameters (so equality is not that of two idle runs)."""
    sys.path.insert(0, str(WORKER.parent))
    import dp_worker

    torch.set_default_dtype(torch.float64)
    try:
        initial = dp_worker._experiment(case, dp_worker._data(case != "map")).modules
        return _max_diff(result["modules"], initial.state_dict())
    finally:
        torch.set_default_dtype(torch.float32)


def test_svi_equals_one_process_on_the_union_batch(two_ranks):
    rank0, rank1 = two_ranks["map"]
    assert rank0["world_size"] == 2 and rank0["steps"] == 10
    assert _max_diff(rank0["modules"], rank1["modules"]) <= 1e-6
    single = _single("map")
    assert _max_diff(rank0["modules"], single["modules"]) <= TOL
    assert rank0["losses"] == pytest.approx(single["losses"], rel=TOL)
    assert _moved(rank0, "map") > 1e-3


@pytest.mark.parametrize("case", ["vae", "nvil"])
def test_svi_and_nvil_ranks_identical(two_ranks, case):
    rank0, rank1 = two_ranks[case]
    # parameters, and for NVIL the baselines' running averages and normalisation moments
    assert _max_diff(rank0["modules"], rank1["modules"]) <= 1e-6
    assert rank0["losses"] == rank1["losses"]
    assert _moved(rank0, case) > 1e-3


def test_lae_equals_one_process_on_the_union_batch(two_ranks):
    rank0, rank1 = two_ranks["lae"]
    assert rank0["accepted"] == rank1["accepted"]
    assert len(rank0["accepted"]) == 20 and 0 < sum(rank0["accepted"]) < 20
    assert _max_diff(rank0["modules"], rank1["modules"]) == 0.0
    single = _single("lae")
    assert rank0["accepted"] == single["accepted"]
    assert _max_diff(rank0["modules"], single["modules"]) <= TOL_LAE
    kernel, ref = rank0["inference"]["kernel"], single["inference"]["kernel"]
    assert kernel["t"] == ref["t"] == 20
    assert kernel["step_size"] == pytest.approx(ref["step_size"], rel=TOL_LAE)
    for key, value in kernel["adapt"].items():
        assert float(value) == pytest.approx(float(ref["adapt"][key]), rel=TOL_LAE, abs=TOL_LAE)
    assert rank0["losses"] == pytest.approx(single["losses"], rel=TOL_LAE)
    assert _moved(rank0, "lae") > 1e-3


def test_cli_two_devices_writes_one_run_and_resumes(tmp_path):
    pytest.importorskip("lightning")
    out = tmp_path / "run"
    common = ["--devices", "2", "--accelerator", "cpu", "--no-progress", "--no-figures"]
    small = ["--hidden-dim", "16", "--latent-dim", "2", "--eval-samples", "5"]
    cmd = [sys.executable, "-m", "pyro_lvm.cli", "train", "vae"]
    first = subprocess.run(
        [*cmd, "--epochs", "1", "--out", str(out), *common, *small],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert first.stdout.count("wrote") == 1  # rank 0 alone reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["num_test"] > 0
    resumed = subprocess.run(
        [*cmd, "--epochs", "2", "--resume", str(out), *common],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["steps"] == 2 * first_steps(out)


def first_steps(out: Path) -> int:
    """Steps per epoch of the run in ``out`` (digits training rows / batch size)."""
    history = json.loads((out / "history.json").read_text())
    return len(history["steps"]) // len(history["epochs"])


# -- in-process: two threads as two ranks ------------------------------------------------


class ThreadCollective:
    """Rank ``rank`` of ``world_size`` threads that sum tensors through a barrier."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.world_size, self._shared = rank, shared["world"], shared

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        shared = self._shared
        shared["slots"][self.rank] = tensor.clone()
        shared["barrier"].wait()
        total = torch.stack(shared["slots"]).sum(0)
        shared["barrier"].wait()  # nobody overwrites a slot before everyone has read
        return total


def _run_ranks(fn, world: int = 2) -> list:
    shared = {"world": world, "slots": [None] * world, "barrier": threading.Barrier(world)}
    results, errors = [None] * world, []

    def target(rank):
        try:
            with data_parallel(ThreadCollective(rank, shared)):
                results[rank] = fn(rank, world)
        except Exception as err:  # reported by the main thread
            errors.append(err)
            shared["barrier"].abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def _share(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x[slice(*shard_bounds(x.shape[0], rank, world))]


def test_shard_bounds_partition_the_rows():
    for n in (7, 8, 9):
        bounds = [shard_bounds(n, r, 3) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert [b - a for a, b in bounds] == [len(t) for t in torch.arange(n).tensor_split(3)]


def test_gather_and_mean_of_uneven_shards():
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(offset_seed(50)))
    results = _run_ranks(
        lambda r, w: (all_gather_cat(_share(x, r, w)), global_mean(_share(x, r, w)))
    )
    for gathered, mean in results:
        assert torch.equal(gathered, x)
        assert mean.item() == pytest.approx(x.mean().item(), rel=1e-6)


def test_gradients_summed_and_missing_gradients_agreed():
    def fn(rank, world):
        p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
        p.grad = torch.full((3,), float(rank + 1))
        q.grad = torch.ones(2) if rank == 1 else None  # only rank 1 touched q
        (loss,) = all_reduce_gradients([p, q], torch.tensor(10.0 * (rank + 1)))
        return p.grad, q.grad, loss

    for p_grad, q_grad, loss in _run_ranks(fn):
        assert torch.equal(p_grad, torch.full((3,), 3.0))
        assert torch.equal(q_grad, torch.ones(2))
        assert loss.item() == 30.0


def _baseline_updates(run, signals, indices):
    """Two updates of a per-datapoint running average and a signal normalisation."""
    average = RunningAverageBaseline(beta=0.5)
    norm = SignalNormalization(beta=0.5)
    for signal, idx in zip(signals, indices):
        signal, idx = run(signal), run(idx)
        ctx = BaselineContext("z", -1, idx, (), None)
        centred = signal - average.predict(ctx, signal)
        average.update(ctx, signal)
        norm.update(centred)
    return {k: v.clone() for k, v in [*average.state_dict().items(), *norm.state_dict().items()]}


def test_baselines_update_from_the_union_batch():
    g = torch.Generator().manual_seed(offset_seed(51))
    signals = [torch.randn(9, generator=g) * 4 + 2 for _ in range(2)]
    indices = [torch.randperm(12, generator=g)[:9] for _ in range(2)]
    single = _baseline_updates(lambda t: t, signals, indices)
    ranks = _run_ranks(lambda r, w: _baseline_updates(lambda t: _share(t, r, w), signals, indices))
    for state in ranks:
        assert state.keys() == single.keys()
        for key, value in single.items():
            assert torch.allclose(state[key].double(), value.double(), atol=1e-6), key


def test_feature_centering_statistics_from_the_union_batch():
    g = torch.Generator().manual_seed(offset_seed(52))
    batches = [torch.randn(9, 4, generator=g) * 3 + 1 for _ in range(3)]

    def centred(run):
        torch.manual_seed(0)
        layer = FeatureCentering(4, momentum=0.3, standardize=True)
        outputs = [layer(run(h)) for h in batches]
        return layer.state_dict(), outputs

    single_state, single_out = centred(lambda t: t)
    for rank, (state, outputs) in enumerate(
        _run_ranks(lambda r, w: centred(lambda t: _share(t, r, w)))
    ):
        for key in ("running_mean", "running_var"):
            assert torch.allclose(state[key], single_state[key], atol=1e-5), key
        for out, ref in zip(outputs, single_out):
            assert torch.allclose(out, _share(ref, rank, 2), atol=1e-5)


# -- what data parallel refuses (one line, before any step) ------------------------------


def _global_latent_experiment():
    """``w`` ~ N(0, I) shared by every row (outside the data plate): its prior and guide
    terms belong to the union batch once, but each rank's loss would carry them."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    from pyro_lvm.experiments.recipes import Experiment
    from pyro_lvm.infer import ModuleSVI

    class GlobalShift(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Parameter(torch.zeros(3))

        def model(self, x):
            w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Normal(w, 1.0).to_event(1), obs=x)

        def guide(self, x):
            pyro.sample("w", dist.Normal(self.loc, 1.0).to_event(1))

    lvm = GlobalShift()
    optim = torch.optim.Adam(lvm.parameters(), lr=0.1)
    return Experiment(lvm=lvm, inference=ModuleSVI(lvm.model, lvm.guide, optim), modules=lvm)


def _bundle(rows: int, dim: int = 3):
    from pyro_lvm.data import DataBundle

    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(offset_seed(50)))
    return DataBundle("toy", x, x[:4].clone(), binary_probs=False)


def test_data_parallel_refuses_global_latents_dlgm_and_empty_shards():
    from pyro_lvm.experiments.build import build_experiment
    from pyro_lvm.experiments.config import TrainConfig
    from pyro_lvm.experiments.fabric import check_data_parallel

    config = TrainConfig(model="custom", devices=2, batch_size=10)
    experiment = _global_latent_experiment()
    before = {k: v.clone() for k, v in experiment.modules.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="latent site 'w' is not per datapoint") as info:
        check_data_parallel(experiment, config, _bundle(40))
    assert len(str(info.value).splitlines()) == 1
    assert torch.equal(torch.get_rng_state(), rng)  # the probe leaves no trace
    assert all(torch.equal(v, before[k]) for k, v in experiment.modules.state_dict().items())

    vae_config = TrainConfig(model="vae", devices=2, batch_size=10, hidden_dim=8, latent_dim=2)
    vae = build_experiment(vae_config, 3)
    check_data_parallel(vae, vae_config, _bundle(40))  # local latents only: accepted
    with pytest.raises(ValueError, match=r"has 1 row \(41 training rows in batches of 10\)"):
        check_data_parallel(vae, vae_config, _bundle(41))

    dlgm_config = TrainConfig(model="dlgm", devices=2, batch_size=10, hidden_dim=8, latent_dim=2)
    dlgm = build_experiment(dlgm_config, 3)
    with pytest.raises(ValueError, match="dlgm does not support --devices"):
        check_data_parallel(dlgm, dlgm_config, _bundle(40))


def test_cli_last_batch_smaller_than_the_ranks_is_one_line(tmp_path):
    pytest.importorskip("lightning")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pyro_lvm.cli", "train", "vae", "--devices", "2"]
    cmd += ["--accelerator", "cpu", "--validation", "99", "--out", str(out), "--no-progress"]
    proc = subprocess.run(
        cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("pyro-lvm: error:")]
    assert errors == [
        "pyro-lvm: error: the last batch of each epoch has 1 row (1401 training rows in "
        "batches of 100), fewer than the 2 processes; pass --batch-size 99 or 101 (or change "
        "--validation)"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not out.exists()
