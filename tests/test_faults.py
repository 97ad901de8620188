"""Faults a long run meets: killed mid-save, a damaged newest checkpoint, two writers,
non-finite parameters at a save, a crashed writer's lock. What must survive is asserted."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pyro_lvm.cli import main
from pyro_lvm.experiments.checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    atomic_save,
    load_checkpoint,
)
from pyro_lvm.experiments.config import TrainConfig
from pyro_lvm.experiments.rundir import RunLock
from pyro_lvm.experiments.trainer import Trainer
from pyro_lvm.infer.diagnostics import DivergenceError

FAST = ["--hidden-dim", "16", "--latent-dim", "2", "--eval-samples", "10"]
QUIET = ["--no-progress", "--no-figures"]


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "vae"
    assert main(["train", "vae", "--out", str(out), "--epochs", "2", *FAST, *QUIET]) == 0
    return out


def test_kill_9_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    # a writer saving 4 MB checkpoints in a loop is killed at several moments; after each
    # kill the file on disk is a complete checkpoint (the newest or the one before)
    path = tmp_path / CHECKPOINT_NAME
    atomic_save({"modules": {"w": torch.zeros(10)}, "i": -1}, path)
    script = textwrap.dedent(
        f"""
        import torch
        from pyro_lvm.experiments.checkpoint import atomic_save
        print("ready", flush=True)
        i = 0
        while True:
            atomic_save({{"modules": {{"w": torch.full((10**6,), float(i))}}, "i": i}},
                        {str(path)!r}, keep_previous=True)
            i += 1
        """
    )
    for delay in (0.3, 0.5, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        ckpt = load_checkpoint(path)
        assert (ckpt["modules"]["w"] == ckpt["i"]).all()  # never a mix of two saves
    leftovers = [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    # a kill orphans at most the two temp files of one save (the new file and the link to
    # the previous slot), never the target
    assert len(leftovers) <= 2 * 3


def test_damaged_newest_checkpoint_falls_back_and_resume_continues(two_epoch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    assert (run / PREVIOUS_NAME).is_file()  # the two slots exist after two epochs
    good = load_checkpoint(run / PREVIOUS_NAME)
    (run / CHECKPOINT_NAME).write_bytes((run / CHECKPOINT_NAME).read_bytes()[:1000])
    with pytest.warns(UserWarning, match="damaged or truncated.*using the previous checkpoint"):
        ckpt = load_checkpoint(run / CHECKPOINT_NAME)
    assert ckpt["trainer"]["epoch"] == good["trainer"]["epoch"] == 1
    # training continues from the epoch before: the epoch lost is retrained
    with pytest.warns(UserWarning, match="using the previous checkpoint"):
        code = main(["train", "vae", "--resume", str(run), "--epochs", "2", *QUIET])
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["steps"] == 30


def test_non_finite_parameters_are_never_saved(two_epoch_run, tmp_path):
    from pyro_lvm.experiments.build import setup_run

    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    before = (run / CHECKPOINT_NAME).read_bytes()
    config = TrainConfig.load(run / "config.json")
    experiment, data = setup_run(config)
    trainer = Trainer(experiment, data, config.batch_size, run, config.seed)
    trainer.restore(run / CHECKPOINT_NAME)
    with torch.no_grad():
        next(experiment.modules.parameters()).fill_(float("nan"))
    with pytest.raises(DivergenceError, match="became non-finite"):
        trainer.save()
    assert (run / CHECKPOINT_NAME).read_bytes() == before


def test_two_writers_one_refused_and_a_crashed_writer_frees_the_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom pyro_lvm.experiments.rundir import RunLock\n"
            f"with RunLock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="in use by another pyro-lvm process"):
            with RunLock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup code runs
        holder.wait()
        holder.stdout.close()
    # the kernel released the lock with the process: the folder is usable again
    assert main(["train", "vae", "--out", str(out), "--epochs", "1", *FAST, *QUIET]) == 0
    assert not (out / ".lock").exists()


def test_two_concurrent_trainings_leave_one_consistent_run(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "vae", "--out", str(out), "--epochs", "3", *FAST, *QUIET]
    cmd = [sys.executable, "-m", "pyro_lvm.cli", *argv]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results  # exactly one writer wins
    loser = next(err for code, err in results if code != 0)
    assert "in use by another" in loser or "already holds a run" in loser, loser
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert metrics["epochs"] == config["epochs"] == ckpt["trainer"]["epoch"] == 3


def test_overwrite_replaces_and_resume_records_effective_settings(two_epoch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    (run / "notes.txt").write_text("mine")
    code = main(["train", "vae", "--resume", str(run), "--epochs", "3", "--lr", "3e-4", *QUIET])
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 3e-4 and config["epochs"] == 3
    from pyro_lvm.experiments.build import setup_run

    experiment, data = setup_run(TrainConfig.load(run / "config.json"))
    Trainer(experiment, data, 100).restore(run / CHECKPOINT_NAME)
    lrs = {g["lr"] for g in experiment.inference.optim.param_groups}
    assert lrs == {3e-4}  # the optimizer really trained (and saved) at the new rate
    argv = ["train", "vae", "--out", str(run), "--epochs", "1", "--overwrite", *FAST, *QUIET]
    assert main(argv) == 0
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert not (run / PREVIOUS_NAME).exists()  # the old run's files are gone...
    assert (run / "notes.txt").read_text() == "mine"  # ...and nothing else
