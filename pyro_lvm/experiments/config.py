"""Run configuration: one dataclass, JSON round-trip, validated in one place."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_lvm.data import DATASETS
from pyro_lvm.models.likelihoods import LIKELIHOODS

__all__ = ["TrainConfig", "COMPILE_MIN_STEPS", "check_types"]

#: the fewest planned training steps for which ``jit_compile=True`` (the CLI's default)
#: compiles with Inductor; shorter runs are eager. Compiling a run's three signatures (full
#: batch, short last batch, evaluation) takes 10-15 s with Inductor's on-disk cache and
#: about a minute without it, on a 2-core machine, and saves 1-3 ms per digits-size step
#: (``benchmarks/compile_time.py``, ``docs/benchmarks.md``): it pays off after 3,000-60,000
#: steps. The README's 750-step digits job stays eager.
COMPILE_MIN_STEPS = 20_000


#: fields whose absence from a saved config.json means the former behaviour: a run
#: written before they existed resumes (and is re-evaluated) as it was trained
FORMER_DEFAULTS = {"project_noise": False}

#: settings renamed since a run may have been saved: old config.json key -> field
RENAMED = {
    "langevin_steps": "num_steps",
    "target_accept": "target_accept_prob",
    "adapt": "adapt_step_size",
}


@dataclass
class TrainConfig:
    """Every setting of a training run (the CLI's flags, written to ``config.json``).

    Recipes read the fields they need; unknown recipes ignore the rest.
    """

    model: str = "vae"
    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    epochs: int = 50
    batch_size: int = 100
    latent_dim: int = 8
    hidden_dim: int = 256
    depth: int = 2
    layer_norm: bool = False
    #: orthogonal weights and zero biases in every MLP (the LAE paper's initialisation)
    orthogonal_init: bool = False
    lr: float = 1e-3
    optimizer: str = "adam"
    likelihood: str = "bernoulli"
    seed: int = 0
    eval_samples: int = 1000
    eval_ais: int = 0
    #: vae: the Gaussian KL term in closed form (TraceMeanField_ELBO) instead of Monte Carlo
    analytic_kl: bool = True
    #: vae, lae: compile the loss or potential (pyro_lvm.infer.compile). True: with Inductor
    #: for runs of at least COMPILE_MIN_STEPS planned steps, eagerly for shorter ones;
    #: "inductor" or "fx": always that backend; False (--no-jit): eagerly
    jit_compile: bool | str = True
    device: str = "cpu"
    #: data parallel (Lightning Fabric): processes per node, strategy, nodes; the
    #: accelerator is --device's (--accelerator gpu sets --device cuda)
    devices: int = 1
    strategy: str = "ddp"
    num_nodes: int = 1
    out: str = "runs/latest"
    #: experiment tracker besides the run folder's logs/metrics.csv:
    #: csv (none) | tensorboard | mlflow | wandb
    logger: str = "csv"
    #: rows of the training set held out for validation (0: none)
    validation: int = 0
    #: stop after this many epochs without improvement of the monitored loss (0: never)
    early_stopping: int = 0
    #: learning-rate schedule per epoch: none | cosine (to 0 at --epochs) | step
    lr_schedule: str = "none"
    #: step schedule: multiply the rate by lr_gamma every lr_step epochs
    lr_step: int = 10
    lr_gamma: float = 0.1
    #: clip the global gradient norm (None: off)
    clip_norm: float | None = None
    #: a user's model: "path.py:NAME" or "module:NAME" (model "custom")
    model_file: str | None = None
    #: network family: mlp | conv (vae, vae-flow, dlgm, lae; image data)
    arch: str = "mlp"
    #: vae-flow: number of flows and their kind (iaf | planar)
    num_flows: int = 2
    flow: str = "iaf"
    # Langevin (lae, dlgm)
    num_steps: int = 2
    step_size: float | None = None
    target_accept_prob: float = 0.574
    mh: bool = True
    adapt_step_size: bool = True
    test_scale: float = 0.05
    #: lae, dlgm: MALA steps from the encoder that fit the proposal of test_nll (0: the
    #: encoder's fixed proposal, whose numbers are also reported under ``*_fixed`` keys)
    refine_steps: int = 20
    #: lae: feature preconditioning damping of the training chain (None: the paper's chain
    #: on the head weight, as ``LAE``'s own default; AmortizedLangevin's MCMC default is
    #: 1e-3, see docs/langevin.md "Training defaults")
    precondition: float | None = None
    #: lae: encoder feature normalization before the chain layer (none|center|standardize).
    #: Differs from LangevinAutoencoder's "none" (the paper's encoder) on purpose: without
    #: centring, the features' shared mode sets the step size and the chain freezes on
    #: digits (docs/langevin.md, "Beating the VAE")
    feature_norm: str = "center"
    #: lae: Jacobian correction of the trunk's gradient (LAE's default too; same doc)
    jacobian: bool = True
    #: lae: proposal noise of the chain weight only in the batch's feature span (on here,
    #: off in the kernel, which keeps the paper's chain: the weight's free random walk
    #: outside the span is what inflates it over a long training run; same doc)
    project_noise: bool = True
    # Bernoulli latents (sbn)
    estimator: str = "nvil"
    num_particles: int = 1
    num_layers: int = 1
    # ppca
    fit: str = "svi"
    # ae-gmm
    num_components: int = 10

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` for impossible settings (a value of the wrong
        type first: :func:`check_types`)."""
        check_types(self.to_dict(), "TrainConfig")
        finite = ("lr", "step_size", "target_accept_prob", "test_scale", "precondition")
        for name in (*finite, "lr_gamma", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be finite, got {value}")
        checks = [
            (
                0 <= self.seed < 2**32,
                f"--seed must be between 0 and 2**32 - 1, got {self.seed}",
            ),
            (
                self.likelihood in LIKELIHOODS,
                f"--likelihood must be {' or '.join(LIKELIHOODS)}, got {self.likelihood!r}",
            ),
            (
                self.optimizer in ("adam", "sgd"),
                f"--optimizer must be adam or sgd, got {self.optimizer!r}",
            ),
            (
                self.dataset in DATASETS,
                f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}",
            ),
            (self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.latent_dim > 0, f"--latent-dim must be positive, got {self.latent_dim}"),
            (self.hidden_dim > 0, f"--hidden-dim must be positive, got {self.hidden_dim}"),
            (self.depth >= 0, f"--depth must be >= 0, got {self.depth}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.eval_samples > 0, f"--eval-samples must be positive, got {self.eval_samples}"),
            (self.eval_ais >= 0, f"--eval-ais must be >= 0, got {self.eval_ais}"),
            (
                self.num_steps > 0,
                f"--num-steps must be positive, got {self.num_steps}",
            ),
            (
                self.step_size is None or self.step_size > 0,
                f"--step-size must be positive, got {self.step_size}",
            ),
            (
                0 < self.target_accept_prob < 1,
                f"--target-accept-prob must be in (0, 1), got {self.target_accept_prob}",
            ),
            (self.test_scale > 0, f"--test-scale must be positive, got {self.test_scale}"),
            (self.arch in ("mlp", "conv"), f"--arch must be mlp or conv, got {self.arch!r}"),
            (
                self.logger in ("csv", "tensorboard", "mlflow", "wandb"),
                f"--logger must be csv, tensorboard, mlflow or wandb, got {self.logger!r}",
            ),
            (self.num_flows > 0, f"--num-flows must be positive, got {self.num_flows}"),
            (self.flow in ("iaf", "planar"), f"--flow must be iaf or planar, got {self.flow!r}"),
            (self.validation >= 0, f"--validation must be >= 0, got {self.validation}"),
            (
                self.early_stopping >= 0,
                f"--early-stopping must be >= 0 epochs, got {self.early_stopping}",
            ),
            (
                self.lr_schedule in ("none", "cosine", "step"),
                f"--lr-schedule must be none, cosine or step, got {self.lr_schedule!r}",
            ),
            (self.lr_step > 0, f"--lr-step must be positive, got {self.lr_step}"),
            (0 < self.lr_gamma <= 1, f"--lr-gamma must be in (0, 1], got {self.lr_gamma}"),
            (
                self.clip_norm is None or self.clip_norm > 0,
                f"--clip-norm must be positive, got {self.clip_norm}",
            ),
            (self.refine_steps >= 0, f"--refine-steps must be >= 0, got {self.refine_steps}"),
            (self.num_layers > 0, f"--num-layers must be positive, got {self.num_layers}"),
            (
                self.num_components > 0,
                f"--num-components must be positive, got {self.num_components}",
            ),
            (
                self.precondition is None or self.precondition > 0,
                f"--precondition must be positive, got {self.precondition}",
            ),
            (
                self.feature_norm in ("none", "center", "standardize"),
                f"--feature-norm must be none, center or standardize, got {self.feature_norm!r}",
            ),
            (
                self.num_particles > 0,
                f"--num-particles must be positive, got {self.num_particles}",
            ),
            (self.devices > 0, f"--devices must be positive, got {self.devices}"),
            (self.num_nodes > 0, f"--num-nodes must be positive, got {self.num_nodes}"),
            (self.strategy == "ddp", f"--strategy must be ddp, got {self.strategy!r}"),
            (
                self.devices * self.num_nodes == 1 or not self.device.startswith("cuda:"),
                f"--device {self.device} names one GPU; with --devices pass --device cuda "
                "(each process takes its own)",
            ),
            (
                self.batch_size >= self.devices * self.num_nodes,
                f"--batch-size {self.batch_size} is smaller than the "
                f"{self.devices * self.num_nodes} processes; pass --batch-size >= devices * "
                "num-nodes (--batch-size is the global batch)",
            ),
            (
                self.device in ("cpu", "cuda") or self.device.startswith("cuda:"),
                f"--device must be cpu or cuda, got {self.device!r}",
            ),
            (
                self.jit_compile in (True, False, "inductor", "fx"),
                f"jit_compile must be true, false, inductor or fx, got {self.jit_compile!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def compile_backend(self, num_train: int | None = None) -> bool | str:
        """What the recipes pass as ``jit_compile=`` for a run over ``num_train`` rows:
        ``jit_compile=True`` becomes ``"inductor"`` when the run plans at least
        :data:`COMPILE_MIN_STEPS` steps and ``False`` (eager) otherwise, or when the run's
        length is unknown (``num_train=None``: a model rebuilt to evaluate); other values
        are kept. The one place the CLI's compile default is decided
        (:func:`~pyro_lvm.experiments.build.setup_run` resolves it for a run)."""
        if self.jit_compile is not True:
            return self.jit_compile
        if num_train is None:
            return False
        steps = self.epochs * math.ceil(num_train / self.batch_size)
        return "inductor" if steps >= COMPILE_MIN_STEPS else False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """The saved settings; a field added later with a default that changes the
        algorithm takes the value the run was trained with (:data:`FORMER_DEFAULTS`).

        Raises a one-line ``ValueError`` naming ``path`` when it is not JSON, not an
        object of settings, or holds a value of the wrong type.
        """
        data = read_json_object(path, "run config")
        data = {RENAMED.get(k, k): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        fields = check_types({k: v for k, v in data.items() if k in known}, str(path))
        return cls(**{**FORMER_DEFAULTS, **fields})


def read_json_object(path: str | Path, what: str) -> dict:
    """The JSON object in ``path`` (one-line ``ValueError`` naming the file otherwise;
    ``FileNotFoundError`` when it is missing)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not a valid {what} (not JSON: {err.msg} at line {err.lineno}, column "
            f"{err.colno}); fix or restore the file"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not a valid {what} (not UTF-8 text); fix or restore the file"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} is not a valid {what} (a JSON {_json_kind(data)}, not an object of "
            "settings); fix or restore the file"
        )
    return data


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number with a fraction" if not float(value).is_integer() else "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _shown(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_types(values: Mapping[str, Any], where: str) -> dict:
    """``values`` (settings by :class:`TrainConfig` field name) checked against the
    dataclass's field types; an integer where a number belongs becomes a float.

    JSON has one number type and Python's ``bool`` is an ``int``, so the rules are
    explicit: an ``int`` field takes only integers (not ``true``, not ``1.5``), a
    ``float`` field any number but a boolean, a ``bool`` field only ``true``/``false``
    (the string ``"false"`` is truthy), a ``str`` field only strings; ``None`` only where
    the default allows it. Raises a one-line ``ValueError`` naming ``where``, the key and
    the expected type.
    """
    hints = _field_types()
    checked = {}
    for key, value in values.items():
        if key not in hints:
            checked[key] = value
            continue
        bases, optional = hints[key]
        ok = (value is None and optional) or any(
            isinstance(value, base)
            and not (isinstance(value, bool) and base is not bool)
            or (base is float and isinstance(value, int) and not isinstance(value, bool))
            for base in bases
        )
        if not ok:
            expected = " or ".join(_KINDS[b] for b in bases) + (" or null" if optional else "")
            raise ValueError(
                f"{where}: {key} must be {expected}, got {_shown(value)} (a {_json_kind(value)})"
            )
        as_float = bases == (float,) and value is not None
        checked[key] = float(value) if as_float else value
    return checked


@functools.cache
def _field_types() -> dict[str, tuple[tuple[type, ...], bool]]:
    """``{field: (types, optional)}`` of :class:`TrainConfig` (``jit_compile`` takes a
    boolean or a backend name)."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        out[name] = (tuple(args), type(None) in typing.get_args(hint))
    return out
