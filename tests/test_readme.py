"""The README's Python tour runs as written, and its commands match the CI script."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_tour_runs():
    namespace = {}
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["iwae"].shape == (10,) and namespace["ais"].shape == (10,)
    assert (namespace["iwae"] < 0).all()


def test_readme_starts_with_the_two_commands():
    first, second = _blocks("bash")[:2]
    assert "pip install -e ." in first and "pyro-lvm train" in first
    assert 'pip install -e ".[test]"' in second and "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip" install --quiet -e ".[test]"' in ci and "-m pytest" in ci
