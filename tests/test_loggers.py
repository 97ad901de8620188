"""Experiment loggers: the CSV log always, TensorBoard, MLflow (local store) and W&B
(offline) through Lightning's classes; every round trip reads back what the run wrote."""

import csv
import importlib.util
import json

import pytest

from pyro_lvm.cli import main
from pyro_lvm.experiments.loggers import CSVLog, check_logger, open_logger

FAST = ["--hidden-dim", "16", "--latent-dim", "2", "--eval-samples", "10", "--no-progress"]


def _train(out, *flags, epochs=2):
    argv = ["train", "vae", "--out", str(out), "--epochs", str(epochs), *FAST, *flags]
    assert main(argv) == 0


def _rows(out):
    with (out / "logs" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _history(out):
    return json.loads((out / "history.json").read_text())["epochs"]


def test_csv_log_has_every_epoch_and_the_results_and_survives_resume(tmp_path):
    out = tmp_path / "vae"
    _train(out, "--validation", "100")
    rows = _rows(out)
    epochs = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in epochs] == [1, 2]
    for row, record in zip(epochs, _history(out)):
        assert float(row["train/loss"]) == record["train_loss"]
        assert float(row["validation/loss"]) == record["val_loss"]
    metrics = json.loads((out / "metrics.json").read_text())
    (result,) = [r for r in rows if r["test/test_nll"]]
    assert int(result["step"]) == 2 and float(result["test/test_nll"]) == metrics["test_nll"]
    assert "test/num_train" not in result  # counts are settings, not metrics
    # --resume to 3 epochs: epochs 1-2 once, epoch 3 appended, the new results at step 3
    assert main(["train", "vae", "--resume", str(out), "--epochs", "3", "--no-progress"]) == 0
    rows = _rows(out)
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [1, 2, 3]
    assert [int(r["step"]) for r in rows if r["test/test_nll"]] == [2, 3]
    assert [float(r["train/loss"]) for r in rows if r["train/loss"]] == [
        r["train_loss"] for r in _history(out)
    ]


def test_csv_log_drops_the_rows_after_the_checkpoint(tmp_path):
    """A run killed after logging epochs its checkpoint does not hold logs them again."""
    log = CSVLog(tmp_path)
    for step in range(1, 6):
        log.log_metrics({"train/loss": float(step)}, step)
    log.log_metrics({"test/nll": 7.0}, 5)  # a new key widens the header
    with (tmp_path / "metrics.csv").open(newline="") as f:
        assert next(csv.reader(f)) == ["step", "test/nll", "train/loss"]
    resumed = CSVLog(tmp_path, resume_step=3)
    resumed.log_metrics({"train/loss": 40.0}, 4)
    with (tmp_path / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"]) for r in rows] == [
        ("1", "1.0"),
        ("2", "2.0"),
        ("3", "3.0"),
        ("4", "40.0"),
    ]


def test_csv_needs_no_lightning_and_a_missing_tracker_is_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lightning" else real(name)
    )
    logger = open_logger(tmp_path, "csv")
    logger.log_metrics({"train/loss": 1.5}, 1)
    logger.close()
    assert _rows(tmp_path) == [{"step": "1", "train/loss": "1.5"}]
    with pytest.raises(ValueError, match=r"pip install pyro-lvm\[mlflow\]") as err:
        check_logger("mlflow")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="--logger must be one of"):
        check_logger("neptune")


def test_logger_flag_is_checked_before_anything_is_written(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name)
    )
    out = tmp_path / "vae"
    assert main(["train", "vae", "--out", str(out), *FAST, "--logger", "wandb"]) == 2
    assert "pip install pyro-lvm[wandb]" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", "vae", "--out", str(out), *FAST, "--logger", "nope"]) == 2


def test_tensorboard_gets_scalars_validation_images_and_hparams(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "vae"
    _train(out, "--logger", "tensorboard", "--validation", "100")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(r["epoch"], r["train_loss"]) for r in _history(out)]
    assert [s for s, _ in losses] == [s for s, _ in expected]
    assert [v for _, v in losses] == pytest.approx([v for _, v in expected], rel=1e-6)
    test_nll = json.loads((out / "metrics.json").read_text())["test_nll"]
    assert events.Scalars("test/test_nll")[0].value == pytest.approx(test_nll, rel=1e-6)
    assert len(events.Scalars("validation/loss")) == 2
    assert {"figures/training", "figures/samples"} <= set(events.Tags()["images"])
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")


def test_mlflow_local_store_round_trip_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "vae"
    _train(out, "--logger", "mlflow", "--no-figures", epochs=1)
    assert main(["train", "vae", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run_id = json.loads((out / "logs" / "tracker.json").read_text())["id"]
    (experiment,) = [e for e in client.search_experiments() if e.name == "pyro-lvm"]
    (run,) = client.search_runs([experiment.experiment_id])  # the resumed run continued it
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [
        (r["epoch"], pytest.approx(r["train_loss"])) for r in _history(out)
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["test/test_nll"] == pytest.approx(metrics["test_nll"])
    assert run.data.params["model"] == "vae" and float(run.data.params["lr"]) == 1e-3


def test_wandb_offline_round_trip(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "vae"
    _train(out, "--logger", "wandb", "--no-figures", epochs=1)
    run_id = json.loads((out / "logs" / "tracker.json").read_text())["id"]
    (folder,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert any(folder.glob("*.wandb"))


class _BrokenTracker:
    kind = "mlflow"

    def log_metrics(self, metrics, step):
        raise ConnectionError("tracking server unreachable\nretry later")


def test_a_failing_tracker_warns_once_and_the_csv_log_goes_on(tmp_path):
    logger = open_logger(tmp_path, "csv")
    logger.tracker = _BrokenTracker()
    with pytest.warns(UserWarning, match="--logger mlflow stopped logging .*unreachable"):
        logger.log_metrics({"train/loss": 1.0}, 1)
    logger.log_metrics({"train/loss": 0.5}, 2)  # no tracker left: no second warning
    logger.close()
    assert [r["train/loss"] for r in _rows(tmp_path)] == ["1.0", "0.5"]
