"""Run configuration: one dataclass, JSON round-trip, validated in one place."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TrainConfig"]


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
    #: vae, lae: trace the model once per batch shape and replay it (CompiledFunction);
    #: the ready models have a fixed structure, so this only removes Pyro's per-step cost
    jit_compile: bool = True
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
    #: LAE feature preconditioning damping (None: plain ALD on the last-layer weight)
    precondition: float | None = None
    #: lae: encoder feature normalization before the chain layer (none|center|standardize)
    feature_norm: str = "center"
    #: lae: Jacobian correction of the trunk's gradient in the centring layer
    jacobian: bool = True
    #: lae: proposal noise of the chain weight only in the batch's feature span
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
        """Raise a one-line ``ValueError`` for impossible settings."""
        finite = ("lr", "step_size", "target_accept_prob", "test_scale", "precondition")
        for name in (*finite, "lr_gamma", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be finite, got {value}")
        checks = [
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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """The saved settings; a field added later with a default that changes the
        algorithm takes the value the run was trained with (:data:`FORMER_DEFAULTS`)."""
        data = json.loads(Path(path).read_text())
        data = {RENAMED.get(k, k): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        return cls(**{**FORMER_DEFAULTS, **fields})
