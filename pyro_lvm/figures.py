"""The standard figures of a run, written as PNG files (used by the CLI and examples)."""

from __future__ import annotations

from pathlib import Path

import torch

from pyro_lvm.data.bundle import DataBundle
from pyro_lvm.experiments.trainer import TrainerState
from pyro_lvm.recipes.base import Experiment

__all__ = ["write_figures", "save_sample_grid"]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _images(x: torch.Tensor, data: DataBundle, experiment: Experiment):
    from pyro_lvm.viz.figures import to_images

    return to_images(x, data.image_shape, experiment.lvm.likelihood.data_range)


def save_sample_grid(
    x: torch.Tensor, data: DataBundle, experiment: Experiment, path: Path
) -> None:
    from pyro_lvm.viz.figures import image_grid

    _save(image_grid(_images(x, data, experiment), nrow=8, title="samples"), path)


@torch.no_grad()
def write_figures(
    experiment: Experiment, data: DataBundle, state: TrainerState, out: Path
) -> list[Path]:
    """Samples, reconstructions, latent scatter, interpolation, training curves and, for
    MCMC-based models, acceptance and step size over training."""
    from pyro_lvm.viz import figures as F

    out = Path(out)
    lvm = experiment.lvm
    device = next(experiment.modules.parameters()).device
    written = []

    def save(fig, name):
        _save(fig, out / name)
        written.append(out / name)

    save(F.training_curves(state.steps, state.history), "training.png")
    if any("accept_rate" in s for s in state.steps):
        save(F.sampler_trace(state.steps), "sampler.png")
    test_x = data.test_x.to(device)
    try:
        z = lvm.encode(test_x)
    except NotImplementedError:
        z = None
    if z is not None:
        labels = data.test_y if data.test_y is not None else None
        save(F.latent_scatter(z.float(), labels), "latent.png")
    if data.image_shape is None:
        return written
    save_sample_grid(lvm.generate(64).cpu(), data, experiment, out / "samples.png")
    written.append(out / "samples.png")
    if z is not None:
        x = test_x[:16]
        save(
            F.reconstructions(
                _images(x, data, experiment), _images(lvm.reconstruct(x), data, experiment)
            ),
            "reconstructions.png",
        )
        t = torch.linspace(0, 1, 10, device=device).unsqueeze(-1)
        rows = []
        for a, b in ((0, 1), (2, 3), (4, 5), (6, 7)):
            line = (1 - t) * z[a] + t * z[b]
            rows.append(
                _images(lvm.likelihood.mean(lvm.decoder(line.to(z.dtype))), data, experiment)
            )
        save(F.interpolation(rows), "interpolation.png")
    return written
