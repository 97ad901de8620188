"""``pyro-lvm compare``: every requested row and seed, and a resume that retrains nothing."""

import json

from seeding import offset_seed

from pyro_lvm.cli import main
from pyro_lvm.experiments.compare import compare
from pyro_lvm.experiments.config import TrainConfig

# the LAE chain needs at least as many encoder features as rows in a batch
TINY = dict(epochs=1, hidden_dim=32, depth=1, latent_dim=2, batch_size=32, eval_samples=4)


def test_compare_writes_every_row_and_seed_then_resumes_without_retraining(tmp_path):
    models, seeds = ["vae", "lae"], [offset_seed(0), offset_seed(1)]
    settings = TrainConfig(likelihood="logistic", eval_ais=2, **TINY)
    events, own = [], {"lae": {"num_steps": 3}}
    results = compare(
        models, seeds, settings, tmp_path, model_settings=own, callback=events.append
    )
    assert [(e.kind, e.model, e.seed) for e in events if e.kind != "done"] == [
        ("train", m, s) for m in models for s in seeds
    ]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["model"], r["seed"]) for r in saved] == [(m, s) for m in models for s in seeds]
    for row in saved:
        for key in ("test_nelbo_per_dim", "test_nll", "test_nll_ais", "sample_frechet"):
            assert isinstance(row[key], float) and row[key] == row[key], (row["model"], key)
        assert row["ms_per_step"] > 0
    table = (tmp_path / "compare.md").read_text()
    assert "| vae |" in table and "| lae |" in table and "+-" in table
    assert (tmp_path / "compare.png").stat().st_size > 0
    steps = {
        m: json.loads((tmp_path / f"{m}-seed{seeds[0]}/config.json").read_text()) for m in models
    }
    assert steps["lae"]["num_steps"] == 3 and steps["vae"]["num_steps"] == 2
    assert len(list(tmp_path.glob("frechet_classifier-digits-logistic-*.pt"))) == 1

    checkpoints = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*-seed*/checkpoint.pt")}
    assert len(checkpoints) == len(models) * len(seeds)
    events.clear()
    again = compare(models, seeds, settings, tmp_path, model_settings=own, callback=events.append)
    assert {e.kind for e in events if e.kind != "done"} == {"reuse"}
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    assert again == results


def test_compare_cli_and_changed_settings_are_refused(tmp_path, capsys):
    argv = ["compare", "--models", "vae", "--seeds", "0", "--out", str(tmp_path)]
    tiny = ["--epochs", "1", "--hidden-dim", "8", "--latent-dim", "2", "--eval-samples", "2"]
    assert main([*argv, *tiny, "--no-progress", "--no-sample-quality"]) == 0
    out = capsys.readouterr().out
    assert "| vae |" in out and "compare.json" in out
    assert main([*argv, *tiny, "--no-progress", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lr" in err and "another --out" in err


def test_compare_reevaluates_what_it_cannot_reuse(tmp_path, capsys):
    """Metrics evaluated with other settings (a ``pyro-lvm evaluate`` since), a failed
    evaluation (``null``) and a damaged ``metrics.json`` are re-evaluated, never reused."""
    settings = TrainConfig(**{**TINY, "eval_samples": 5})
    run = tmp_path / "vae-seed0"
    events = []
    (first,) = compare(["vae"], [0], settings, tmp_path, sample_quality=False)

    def again() -> dict:
        events.clear()
        (row,) = compare(
            ["vae"], [0], settings, tmp_path, sample_quality=False, callback=events.append
        )
        return row

    assert main(["evaluate", str(run), "--eval-samples", "7"]) == 0
    capsys.readouterr()
    row = again()
    assert [e.kind for e in events if e.kind != "done"] == ["evaluate"]
    assert row["eval_samples"] == 5 and row["test_nll"] == first["test_nll"]
    assert "eval_samples=5" in (tmp_path / "compare.md").read_text()

    metrics = json.loads((run / "metrics.json").read_text())
    for damaged in ({**metrics, "test_nll": None}, [metrics]):
        (run / "metrics.json").write_text(json.dumps(damaged))
        row = again()
        assert [e.kind for e in events if e.kind != "done"] == ["evaluate"]
        assert row["test_nll"] == first["test_nll"]
    again()
    assert [e.kind for e in events if e.kind != "done"] == ["reuse"]
