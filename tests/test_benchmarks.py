"""Smoke test of ``benchmarks/run_all.py --quick``: every case runs and the outputs are
well formed. Speed itself is checked by running the benchmark, never by a timed test."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from seeding import offset_seed

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import run_all  # noqa: E402


def test_run_all_quick_writes_json_and_table(tmp_path):
    results = run_all.main(["--quick", "--out", str(tmp_path), "--seed", str(offset_seed(0))])
    saved = json.loads((tmp_path / "run_all_quick.json").read_text())
    assert saved["meta"]["quick"] and saved["meta"]["threads"] == 1
    assert {r["case"] for r in saved["rows"]} == set(run_all.CASES)
    for row in results["rows"]:
        assert "torch" in row["variants"]
        if row["case"] == "cli":  # the CLI's steps, against its compiled VAE step
            assert {"CLI VAE (compiled)", "CLI LAE (eager)"} <= set(row["variants"])
            assert "CLI LAE (compiled)" in row["ratios"]
        else:
            assert "pyro_lvm" in row["ratios"]
        for timing in row["variants"].values():
            cpu = timing["cpu_ms"]
            assert 0 < cpu["min"] <= cpu["median"] <= cpu["max"]
    table = (tmp_path / "run_all_quick.md").read_text()
    assert "| vae |" in table and "load average" in table


def test_gpu_benchmark_runs_on_cpu_and_exits_cleanly_without_cuda(tmp_path):
    import gpu

    result = gpu.main(["--device", "cpu", "--quick", "--backend", "fx", "--out", str(tmp_path)])
    cases = [f"{m} step ({c})" for m in ("vae", "lae") for c in ("eager", "compiled")]
    assert [r["case"] for r in result["rows"]] == [*cases, "iwae K=100"]
    assert all(r["first_step_s"] > 0 for r in result["rows"] if "compiled" in r["case"])
    assert all(r["ms"] > 0 for r in result["rows"])
    assert json.loads((tmp_path / "gpu_quick_cpu.json").read_text())["rows"] == result["rows"]
    if not torch.cuda.is_available():
        assert gpu.main(["--out", str(tmp_path)]) == {"skipped": "no CUDA"}


def test_loss_curves_reports_the_worst_rise_over_the_best_earlier_epoch(tmp_path):
    import loss_curves

    losses = [10.0 - 0.1 * t for t in range(30)]
    losses[20] = losses[19] + 4.0  # a jump of 4 over the best epoch before it (epoch 20)
    for seed in (0, 1):
        run = tmp_path / f"lae-seed{seed}"
        run.mkdir()
        epochs = [{"epoch": t + 1, "train_loss": v} for t, v in enumerate(losses)]
        (run / "history.json").write_text(json.dumps({"epochs": epochs, "steps": []}))
    out = tmp_path / "curves.png"
    runs = [str(tmp_path / "lae-seed0"), str(tmp_path / "lae-seed1")]
    rows = loss_curves.main(
        ["--out", str(out), "--label", "a", *runs[:1], "--label", "b", *runs[1:]]
    )
    assert out.stat().st_size > 0 and set(rows) == {"a/lae-seed0", "b/lae-seed1"}
    row = rows["a/lae-seed0"]
    assert abs(row["worst_rise"] - 4.0) < 1e-9 and row["worst_rise_epoch"] == 21
    assert row["best"] == min(losses) and row["final"] == losses[-1]


def test_eval_time_reports_both_estimators():
    import eval_time

    results = eval_time.main(
        ["--iwae-images", "4", "--ais-images", "2", "--num-samples", "5", "--ais-steps", "3"]
    )
    assert len(results) == 2
    for row in results.values():
        assert row["cpu_s"] > 0 and row["cpu_min_10k"] > 0 and row["images"] in (2, 4)


def test_pyro_suite_swaps_estimators_and_compares_cases():
    """The harness of Pyro's ELBO suite (running it needs Pyro's source tree): each
    factory takes the keywords Pyro's tests pass, and VIMCO is checked case by case
    against RenyiELBO."""
    import pyro.infer
    import pyro_suite

    from pyro_lvm.infer import VIMCO, TraceNVIL_ELBO

    keywords = dict(max_plate_nesting=1, num_particles=1, strict_enumeration_warning=False)
    made = {name: pyro_suite._factory(name)(**keywords) for name in pyro_suite.ESTIMATORS}
    assert isinstance(made["trace"], pyro.infer.Trace_ELBO)
    assert isinstance(made["renyi"], pyro.infer.RenyiELBO) and made["renyi"].num_particles == 2
    assert isinstance(made["vimco"], VIMCO) and made["vimco"].num_particles == 2
    assert isinstance(made["nvil"], TraceNVIL_ELBO)
    runs = {
        "renyi": {
            "results": {"t.py::a[swapped_renyi]": "passed", "t.py::b[swapped_renyi]": "failed"}
        },
        "vimco": {
            "results": {"t.py::a[swapped_vimco]": "refused", "t.py::b[swapped_vimco]": "passed"}
        },
    }
    summary = pyro_suite.summarize(runs)
    assert summary["rows"]["vimco"] == {"total": 2, "refused": 1, "passed": 1}
    assert summary["check"] == {
        "vimco_passes_where_renyi_passes": False,
        "exceptions": ["t.py::a[*]"],
    }
    assert "| vimco | 2 | 1 | 1 | 0 | 0 |" in pyro_suite.table(summary)


# the DMM's masked padding steps have a flat potential by design: the benchmark reports
# how far they wander, the kernel warns about them
@pytest.mark.filterwarnings("ignore::pyro_lvm.infer.mcmc.checks.FlatPotentialWarning")
def test_ald_vs_nuts_runs_every_case_and_records_refusals(tmp_path):
    import ald_vs_nuts

    out = tmp_path / "ald_vs_nuts.json"
    tiny = ["--seeds", "0", "--draws", "20", "--warmup", "10", "--nuts-draws", "10"]
    tiny += ["--nuts-warmup", "5", "--nuts-max-tree-depth", "3", "--svi-steps", "2"]
    tiny += ["--vae-hidden-dim", "16"]
    result = ald_vs_nuts.main([*tiny, "--cases", "vae3", "dmm", "--out", str(out)])
    rows = {(r["case"], r["sampler"]): r for r in result["rows"]}
    assert set(rows) == {
        (c, s) for c in ("vae3", "dmm") for s in ("nuts", "default", "precondition")
    }
    for (case, sampler), row in rows.items():
        if sampler == "nuts" or "error" in row:  # a refusal is recorded, not raised
            continue
        assert row["num_coordinates"] == (30 if case == "vae3" else 4 * (6 + 6 + 4 + 3))
        assert row["min_ess"] > 0 and row["cpu_s"] > 0
    assert rows[("dmm", "default")]["flat_abs_max"] > 0  # the padding steps are reported
    assert json.loads(out.read_text())["table"] == result["table"]
    bad = ["--cases", "dmm", "--settings", "default", "--kernel-arg", "step_size=-1.0"]
    refused = ald_vs_nuts.main([*tiny, *bad, "--out", str(out)])
    assert "step_size" in refused["rows"][-1]["error"] and "refused" in refused["table"]


@pytest.mark.filterwarnings("ignore::pyro_lvm.infer.mcmc.checks.FlatPotentialWarning")
def test_dmm_lae_trains_every_variant_and_evaluates_by_ais(tmp_path):
    import dmm_lae

    args = ["--seeds", "0", "--steps", "2", "--log-every", "2", "--num-train", "32"]
    args += ["--hessian-iters", "2"]
    args += [
        "--num-test",
        "4",
        "--ais-steps",
        "3",
        "--ais-chains",
        "2",
        "--out",
        str(tmp_path / "d.json"),
    ]
    result = dmm_lae.main(args)
    assert [r["variant"] for r in result["rows"]] == dmm_lae.VARIANTS
    for row in result["rows"]:
        assert math.isfinite(row["ais_mean"]) and len(row["history"]) == 2
        assert row["history"][-1]["hessian_z_max"] > 0
    assert "| lae-onehot |" in result["table"]


def test_vae_example_lae_trains_svi_and_lae_and_scores_both_by_ais(tmp_path):
    import vae_example_lae

    args = ["--seeds", "0", "--epochs", "1", "--hidden-dim", "16", "--batch-size", "16"]
    args += ["--ais-steps", "3"]
    args += ["--ais-chains", "2", "--num-test", "8", "--out", str(tmp_path / "v.json")]
    result = vae_example_lae.main(args)
    assert [r["method"] for r in result["rows"]] == vae_example_lae.METHODS
    for row in result["rows"]:
        assert math.isfinite(row["ais_mean"])
        assert row["method"] == "svi" or math.isfinite(row["minus_svi_mean"])
    assert "| lae-project-noise |" in result["table"]
