"""What a recipe hands to the trainer, the evaluator and the figures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from pyro_lvm.models.base import LatentVariableModel
from pyro_lvm.models.conv import ARCHS, ConvDecoder, ConvEncoder, image_shape_for

__all__ = [
    "Experiment",
    "Inference",
    "conv_networks",
    "langevin_experiment",
    "network_arch",
    "network_options",
]


class Inference(Protocol):
    """SVI-like driver: what the trainer needs from any inference algorithm."""

    def step(self, *args) -> float:
        """One training update on a batch; returns the batch-summed loss."""

    def evaluate_loss(self, *args) -> float:
        """The loss on a batch, without updating anything."""

    def state_dict(self) -> dict:
        """Optimizer and sampler state (step-size adaptation, baselines...)."""

    def load_state_dict(self, state: dict) -> None: ...

    def metrics(self) -> dict[str, float]:
        """Diagnostics of the latest steps, e.g. ``accept_rate`` and ``step_size``."""


@dataclass
class Experiment:
    """A model, its inference algorithm and how to evaluate it.

    Attributes
    ----------
    lvm : LatentVariableModel
        The generative model (``model(x)``, ``decoder``, ``likelihood``, ``encode``).
    inference : Inference
        Training driver; the trainer calls ``inference.step(x)`` (or ``step(x, idx)``
        with dataset row indices when ``pass_index`` is true).
    modules : nn.Module
        Every module with parameters or buffers to checkpoint.
    eval_guide : callable, optional
        Proposal ``guide(x)`` for the ELBO/IWAE evaluator (default ``lvm.guide``).
    fixed_guide : callable, optional
        A second proposal evaluated under the ``*_fixed`` keys: for MCMC-trained models
        whose headline uses a Langevin-refined proposal, the encoder's fixed one (the LAE
        paper's N(encoder(x), 0.05^2 I)).
    continuous_latents : bool
        Whether AIS applies (``--eval-ais``).
    pass_index : bool
        Pass dataset row indices to ``inference.step``.
    extra_metrics : callable, optional
        ``extra_metrics(test_x) -> dict`` merged into ``metrics.json``.
    prepare : callable, optional
        ``prepare(train_x)``: a whole-training-set step before the first minibatch (e.g.
        a closed-form fit); the lifecycle calls it once, on a fresh run.
    finalize : callable, optional
        ``finalize(train_x)``: a whole-training-set step after the last epoch (e.g. the
        mixture prior of ``ae-gmm``), saved with the checkpoint before evaluation.
    """

    lvm: LatentVariableModel
    inference: Inference
    modules: nn.Module
    eval_guide: Callable | None = None
    fixed_guide: Callable | None = None
    continuous_latents: bool = True
    pass_index: bool = False
    extra_metrics: Callable[[torch.Tensor], dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[torch.Tensor], None] | None = None
    finalize: Callable[[torch.Tensor], None] | None = None

    @property
    def guide(self) -> Callable:
        return self.eval_guide if self.eval_guide is not None else self.lvm.guide


def network_options(config) -> dict[str, Any]:
    """The MLP options every recipe shares, so compared methods get identical networks."""
    return {
        "hidden_dim": config.hidden_dim,
        "depth": config.depth,
        "layer_norm": config.layer_norm,
        "orthogonal_init": config.orthogonal_init,
    }


def network_arch(config) -> str:
    """``--arch``: ``mlp`` (default) or ``conv``."""
    arch = getattr(config, "arch", "mlp")
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


def conv_networks(
    config, data_dim: int, encoder_out: int, image_shape: tuple | None = None
) -> tuple[nn.Module, nn.Module]:
    """``(encoder, decoder)`` for ``--arch conv``, with the options every recipe shares.

    The encoder maps flattened images to ``encoder_out`` values (ending in an
    ``nn.Linear``: the chain layer of LAE), the decoder maps ``latent_dim`` values to one
    likelihood parameter per pixel. ``--hidden-dim`` is the width of the fully connected
    layer; ``--depth`` does not apply (two convolution blocks of 32 and 64 channels).
    The image shape comes from ``config.image_shape`` when set, else from ``data_dim``
    (see :func:`~pyro_lvm.models.conv.image_shape_for`).
    """
    shape = image_shape_for(data_dim, image_shape or getattr(config, "image_shape", None))
    options = {
        "hidden_dim": config.hidden_dim,
        "layer_norm": config.layer_norm,
        "orthogonal_init": config.orthogonal_init,
    }
    encoder = ConvEncoder(shape, encoder_out, **options)
    decoder = ConvDecoder(config.latent_dim, shape, **options)
    return encoder, decoder


def langevin_experiment(config, lvm: LatentVariableModel, inference: Inference) -> Experiment:
    """The Experiment of a model trained with Langevin transitions (``lae``, ``dlgm``):
    ``test_nll`` uses a proposal fitted to ``--refine-steps`` MALA steps from the encoder
    (a proposal near the decoder's posterior, so the estimate judges the decoder), the
    encoder's fixed proposal is evaluated under the ``*_fixed`` keys; with
    ``--refine-steps 0`` the fixed proposal is the headline. The figures draw the
    acceptance target when MH and adaptation are on."""
    from pyro_lvm.infer.refine import LangevinProposalGuide

    eval_guide = fixed_guide = lvm.guide
    if config.refine_steps > 0:
        eval_guide = LangevinProposalGuide(
            lvm.model,
            lvm.encode,
            config.refine_steps,
            target_accept_prob=config.target_accept_prob,
        )
    return Experiment(
        lvm=lvm,
        inference=inference,
        modules=lvm,
        eval_guide=eval_guide,
        fixed_guide=fixed_guide if config.refine_steps > 0 else None,
        info={
            "eval_proposal": (
                f"langevin-refined ({config.refine_steps} MALA steps from the encoder)"
                if config.refine_steps > 0
                else "encoder"
            ),
            # the acceptance the step size adapts towards (none without MH or adaptation)
            "target_accept_prob": config.target_accept_prob
            if config.mh and config.adapt_step_size
            else None,
        },
    )
