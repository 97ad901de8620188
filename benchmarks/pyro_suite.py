"""Pyro's own ELBO test suite with our estimators swapped in for ``Trace_ELBO``.

Pyro's ``tests/infer/test_valid_models.py`` (valid and invalid model/guide structures)
and ``tests/infer/test_gradient.py`` (gradients against hand-derived answers) are run
unchanged, except that the name ``Trace_ELBO`` the test modules import from
``pyro.infer`` is bound to a factory for the estimator under test; only the test cases
parametrized by it run. Every estimator accepts the test's keywords; the importance-
weighted ones (``renyi``: ``RenyiELBO(alpha=0)``, ``vimco``) take
``max(2, num_particles)`` particles (both need two), at most ``--max-particles``.
Estimators:

- ``trace``: ``Trace_ELBO`` itself (the control: every selected case must pass);
- ``renyi``: Pyro's ``RenyiELBO(alpha=0)``, the IWAE bound with whole-program weights;
- ``vimco``: :class:`pyro_lvm.infer.VIMCO`;
- ``nvil``: :class:`pyro_lvm.infer.TraceNVIL_ELBO`.

Each case is ``passed``, ``refused`` (a one-line ``ValueError``/``NotImplementedError``
raised inside ``pyro_lvm``), ``failed`` or ``skipped``/``xfailed``. The summary checks
that VIMCO passes every case where ``RenyiELBO`` passes. Prints a table and writes
``benchmarks/results/pyro_suite.json``.

Pyro's tests are not in the installed package; take them from the source release that
matches the installed version (the tests are unchanged from 1.9.1 to the development
head)::

    git clone https://github.com/pyro-ppl/pyro && git -C pyro checkout 1.9.1
    python benchmarks/pyro_suite.py --pyro-src pyro [--estimators renyi vimco]

The module is also the pytest plugin that does the swap (``-p pyro_suite``, configured
through the environment by :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

ESTIMATORS = ["trace", "renyi", "vimco", "nvil"]
FILES = ["tests/infer/test_valid_models.py", "tests/infer/test_gradient.py"]
_ENV = "PYRO_SUITE_ESTIMATOR"
_OUT = "PYRO_SUITE_OUT"
_CAP = "PYRO_SUITE_MAX_PARTICLES"


# -- the pytest plugin ---------------------------------------------------------------------
def _factory(name: str):
    import pyro.infer

    from pyro_lvm.infer import VIMCO, TraceNVIL_ELBO

    trace_elbo = pyro.infer.Trace_ELBO

    def at_least_two(kwargs):
        kwargs["num_particles"] = max(2, kwargs.get("num_particles", 1))
        cap = os.environ.get(_CAP)
        if cap:
            kwargs["num_particles"] = min(kwargs["num_particles"], int(cap))
        return kwargs

    def swapped(*args, **kwargs):
        if args:
            raise TypeError("the swapped estimator takes keywords only")
        if name == "trace":
            return trace_elbo(**kwargs)
        if name == "renyi":
            return pyro.infer.RenyiELBO(alpha=0.0, **at_least_two(kwargs))
        if name == "vimco":
            return VIMCO(**at_least_two(kwargs))
        if name == "nvil":
            return TraceNVIL_ELBO(**kwargs)
        raise ValueError(f"unknown estimator {name!r}; choose from {ESTIMATORS}")

    swapped.__name__ = f"swapped_{name}"
    return swapped


def pytest_configure(config):
    name = os.environ.get(_ENV)
    if name is None:
        return
    import pyro.infer

    # rebinds the name the test modules import (`from pyro.infer import Trace_ELBO`),
    # before they are collected; Pyro's own modules import it from pyro.infer.trace_elbo
    config._pyro_suite_swapped = pyro.infer.Trace_ELBO = _factory(name)
    config._pyro_suite_results = {}
    config._pyro_suite_messages = {}


def pytest_collection_modifyitems(config, items):
    swapped = getattr(config, "_pyro_suite_swapped", None)
    if swapped is None:
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (keep if any(v is swapped for v in params.values()) else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def _refused(excinfo) -> bool:
    if excinfo is None or not excinfo.errisinstance((ValueError, NotImplementedError)):
        return False
    raised_in = str(excinfo.traceback[-1].path)
    return "pyro_lvm" in raised_in and "\n" not in str(excinfo.value)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    results = getattr(item.config, "_pyro_suite_results", None)
    if results is None or not (report.when == "call" or report.failed or report.skipped):
        return
    messages = item.config._pyro_suite_messages
    if report.skipped:
        results[item.nodeid] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.passed:
        results[item.nodeid] = "passed"
    elif _refused(call.excinfo):
        results[item.nodeid] = "refused"
        messages[item.nodeid] = str(call.excinfo.value)
    else:
        results[item.nodeid] = "failed"
        text = str(call.excinfo.value).strip() if call.excinfo else report.longreprtext
        messages[item.nodeid] = f"{call.excinfo.typename if call.excinfo else ''}: " + (
            text.splitlines()[0][:200] if text else ""
        )


def pytest_sessionfinish(session):
    results = getattr(session.config, "_pyro_suite_results", None)
    if results is None or not os.environ.get(_OUT):
        return
    messages = session.config._pyro_suite_messages
    Path(os.environ[_OUT]).write_text(
        json.dumps({"results": results, "messages": messages}, indent=1)
    )


# -- the driver ---------------------------------------------------------------------------
def run_suite(pyro_src: Path, name: str, max_particles: int | None = None) -> dict:
    """Run the selected Pyro tests with ``name`` swapped in; ``{nodeid: outcome}``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        env = dict(os.environ, **{_ENV: name, _OUT: str(out), _CAP: str(max_particles or "")})
        here = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (here, str(pyro_src), env.get("PYTHONPATH")) if p
        )
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "pyro_suite", "-p", "no:cacheprovider"]
        cmd += ["-c", str(pyro_src / "setup.cfg"), "--rootdir", str(pyro_src), *FILES]
        proc = subprocess.run(cmd, cwd=pyro_src, env=env, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"pytest wrote no results:\n{proc.stdout[-3000:]}{proc.stderr}")
        return json.loads(out.read_text())


def summarize(runs: dict) -> dict:
    rows = {}
    for name, run in runs.items():
        counts = Counter(run["results"].values())
        rows[name] = {"total": len(run["results"]), **counts}
    check = None
    if "renyi" in runs and "vimco" in runs:
        # the same case under either estimator: the node id names the factory
        renyi = {k.replace("swapped_renyi", "*"): o for k, o in runs["renyi"]["results"].items()}
        vimco = {k.replace("swapped_vimco", "*"): o for k, o in runs["vimco"]["results"].items()}
        missing = sorted(n for n, o in renyi.items() if o == "passed" and vimco.get(n) != "passed")
        check = {"vimco_passes_where_renyi_passes": not missing, "exceptions": missing}
    return {"rows": rows, "check": check}


def table(summary: dict) -> str:
    lines = ["| estimator | cases | passed | refused | failed | skipped/xfailed |"]
    lines.append("|---|---|---|---|---|---|")
    for name, row in summary["rows"].items():
        other = row.get("skipped", 0) + row.get("xfailed", 0)
        lines.append(
            f"| {name} | {row['total']} | {row.get('passed', 0)} | {row.get('refused', 0)} | "
            f"{row.get('failed', 0)} | {other} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pyro-src", type=Path, required=True, help="a Pyro source tree")
    parser.add_argument("--estimators", nargs="+", default=ESTIMATORS, choices=ESTIMATORS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--max-particles",
        type=int,
        default=None,
        help="cap the importance-weighted estimators' particles (test_gradient asks 50,000)",
    )
    parser.add_argument("--tag", default="pyro_suite", help="name of the JSON written")
    args = parser.parse_args(argv)
    runs = {
        name: run_suite(args.pyro_src.resolve(), name, args.max_particles)
        for name in args.estimators
    }
    summary = summarize(runs)
    print(table(summary))
    if summary["check"] is not None:
        print("VIMCO passes wherever RenyiELBO passes:", summary["check"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(
        json.dumps({"summary": summary, "runs": runs}, indent=1)
    )
    return summary


if __name__ == "__main__":
    main()
