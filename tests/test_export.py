"""``pyro-lvm export``: model.safetensors + config.json, loaded back by load_run."""

import json
import struct

import pyro
import pytest
import torch
from pyro.distributions import constraints
from user_models import PARAM_MODEL

from pyro_lvm import load_run
from pyro_lvm.cli import main
from pyro_lvm.experiments.export import read_export, write_export
from pyro_lvm.experiments.lifecycle import export_run

FAST = ["--epochs", "1", "--hidden-dim", "16", "--eval-samples", "10", "--no-progress"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "vae"
    assert main(["train", "vae", "--out", str(out), *FAST]) == 0
    return out


def _safetensors_header(path) -> dict:
    """The JSON header of a safetensors file (8-byte length, then JSON): no pickle."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length])


def test_export_round_trip_through_the_cli(vae_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(vae_run), str(out)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    header = _safetensors_header(out / "model.safetensors")
    assert header["__metadata__"] == {"format": "pyro-lvm"}
    run, exported = load_run(vae_run), load_run(out)
    a, b = run.experiment.modules.state_dict(), exported.experiment.modules.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert exported.config == run.config and exported.metrics == run.metrics
    assert exported.data_dim == run.data_dim and exported.image_shape == run.image_shape
    torch.manual_seed(0)
    x = run.model.generate(4)
    torch.manual_seed(0)
    assert torch.equal(exported.model.generate(4), x)
    # OUT holds an export: a second export is a one-line error unless --overwrite
    assert main(["export", str(vae_run), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(vae_run), str(out), "--overwrite"]) == 0


def test_pyro_params_round_trip_with_their_constraints(vae_run, tmp_path):
    """Params outside the modules travel as unconstrained values beside the weights."""
    run = load_run(vae_run)
    pyro.clear_param_store()
    gain = pyro.param("gain", torch.tensor([0.5, 2.0]), constraint=constraints.positive)
    mix = pyro.param("mix", torch.tensor(0.3), constraint=constraints.interval(-1.0, 2.0))
    pyro.param("free", torch.tensor([[1.0, -3.0]]))
    before = {
        k: v.detach().clone() for k, v in pyro.get_param_store().get_state()["params"].items()
    }
    data = {"data_dim": run.data_dim, "image_shape": run.image_shape}
    write_export(run.experiment.modules, run.config.to_dict(), data, tmp_path, run.metrics)
    pyro.clear_param_store()
    load_run(tmp_path)
    store = pyro.get_param_store()
    state = store.get_state()
    assert set(state["params"]) == set(before)  # the modules' own tensors are not params
    for name, value in before.items():
        assert torch.equal(state["params"][name], value)  # bit for bit, unconstrained
    assert torch.allclose(pyro.param("gain"), gain) and torch.allclose(pyro.param("mix"), mix)
    assert state["constraints"]["gain"] is constraints.positive
    interval = state["constraints"]["mix"]
    assert (interval.lower_bound, interval.upper_bound) == (-1.0, 2.0)


def test_export_leaves_the_callers_param_store_alone(vae_run, tmp_path):
    pyro.clear_param_store()
    mine = pyro.param("mine", torch.tensor(1.5))
    export_run(vae_run, tmp_path)
    _, _, params = read_export(tmp_path)
    assert params == {}  # this run's checkpoint holds no params outside its modules
    assert list(pyro.get_param_store().keys()) == ["mine"] and pyro.param("mine") is mine


def test_bad_export_folders_are_one_line_errors(vae_run, tmp_path):
    export_run(vae_run, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["export"]["format"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="export format 99") as err:
        load_run(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a pyro-lvm export's config"):
        load_run(tmp_path)


def test_a_constraint_an_export_cannot_record_is_refused(vae_run, tmp_path):
    run = load_run(vae_run)
    pyro.clear_param_store()
    bounds = constraints.interval(torch.zeros(2), torch.tensor([1.0, 2.0]))  # tensor bounds
    pyro.param("odd", torch.tensor([0.5, 0.5]), constraint=bounds)
    data = {"data_dim": run.data_dim, "image_shape": run.image_shape}
    with pytest.raises(
        ValueError, match="pyro.param 'odd': its constraint holds a tensor of shape"
    ):
        write_export(run.experiment.modules, run.config.to_dict(), data, tmp_path)


def test_a_trained_runs_pyro_params_travel_through_the_cli_export(tmp_path):
    """train custom (params in Pyro's store, checkpointed) -> export -> load_run."""
    spec = tmp_path / "prior_params.py"
    spec.write_text(PARAM_MODEL)
    model_file = f"{spec}:build"
    run, out = tmp_path / "run", tmp_path / "exported"
    argv = ["train", "custom", "--model-file", model_file, "--out", str(run), "--lr", "0.05"]
    assert main([*argv, "--epochs", "2", "--latent-dim", "2", *FAST[2:], "--no-figures"]) == 0
    pyro.clear_param_store()  # each step below as in a fresh process
    load_run(run, model_file=model_file)
    trained = pyro.get_param_store().get_state()
    assert not torch.equal(pyro.param("prior_scale").detach(), torch.ones(2))  # trained
    pyro.clear_param_store()
    assert main(["export", str(run), str(out), "--model-file", model_file]) == 0
    assert list(pyro.get_param_store().keys()) == []  # the export left the store alone
    config = json.loads((out / "config.json").read_text())
    assert config["export"]["params"]["prior_scale"] == {"constraint": {"name": "positive"}}
    load_run(out, model_file=model_file)
    loaded = pyro.get_param_store().get_state()
    for name in ("prior_loc", "prior_scale"):
        assert torch.equal(loaded["params"][name], trained["params"][name])  # unconstrained
    assert loaded["constraints"]["prior_scale"] is constraints.positive
    with pytest.raises(ValueError, match="pass model_file="):
        load_run(out)  # loading never imports code by itself
