"""Figures for trained latent variable models. Each function returns a Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = [
    "image_grid",
    "reconstructions",
    "latent_scatter",
    "interpolation",
    "training_curves",
    "sampler_trace",
    "to_images",
]


def to_images(x: torch.Tensor, image_shape, value_range=(0.0, 1.0)) -> np.ndarray:
    """Flattened data -> ``(N, H, W)`` or ``(N, H, W, C)`` arrays in [0, 1]."""
    lo, hi = value_range
    x = ((x.detach().cpu().float() - lo) / (hi - lo)).clamp(0, 1)
    c, h, w = image_shape
    imgs = x.reshape(-1, c, h, w).permute(0, 2, 3, 1).numpy()
    return imgs[..., 0] if c == 1 else imgs


def _tile(imgs: np.ndarray, nrow: int) -> np.ndarray:
    n = len(imgs)
    ncol = int(np.ceil(n / nrow))
    h, w = imgs.shape[1:3]
    canvas = np.ones((nrow * (h + 1) - 1, ncol * (w + 1) - 1) + imgs.shape[3:])
    for i, img in enumerate(imgs):
        r, c = divmod(i, ncol)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img
    return canvas


def image_grid(images: np.ndarray, nrow: int = 8, title: str = "") -> plt.Figure:
    """A grid of images (e.g. samples from the model)."""
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(_tile(images, nrow), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title)
    return fig


def reconstructions(inputs: np.ndarray, recons: np.ndarray, title: str = "") -> plt.Figure:
    """Inputs (top rows) next to their reconstructions (bottom rows)."""
    n = len(inputs)
    both = np.concatenate([inputs, recons])
    fig, ax = plt.subplots(figsize=(min(12, n), 2.5))
    ax.imshow(_tile(both, 2), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title or "inputs (top) and reconstructions (bottom)")
    return fig


def latent_scatter(z: torch.Tensor, labels: torch.Tensor | None = None) -> plt.Figure:
    """Latent codes coloured by label; a PCA projection to 2-D when ``latent_dim > 2``."""
    z = z.detach().cpu().float()
    xlabel, ylabel = "z1", "z2"
    if z.shape[1] > 2:
        centred = z - z.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        z = centred @ v[:2].T
        xlabel, ylabel = "PC1 of z", "PC2 of z"
    elif z.shape[1] == 1:
        z = torch.cat([z, torch.zeros_like(z)], 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    c = labels.cpu().numpy() if labels is not None else None
    sc = ax.scatter(z[:, 0], z[:, 1], c=c, cmap="tab10", s=6)
    if c is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def interpolation(rows: np.ndarray, title: str = "") -> plt.Figure:
    """Each row: decoded points on a straight line between two encoded inputs."""
    n_rows = len(rows)
    flat = np.concatenate(list(rows))
    fig, ax = plt.subplots(figsize=(8, 1 + n_rows))
    ax.imshow(_tile(flat, n_rows), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title or "latent interpolation")
    return fig


def training_curves(steps: list[dict], history: list[dict]) -> plt.Figure:
    """Training loss per datapoint, per step and per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if steps:
        ax.plot(
            [s["step"] for s in steps],
            [s["loss"] for s in steps],
            lw=0.5,
            alpha=0.5,
            label="per step",
        )
    if history:
        per_epoch = len(steps) / max(len(history), 1)
        ax.plot(
            [h["epoch"] * per_epoch for h in history],
            [h["train_loss"] for h in history],
            "o-",
            label="epoch mean",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per datapoint)")
    ax.legend()
    return fig


def sampler_trace(steps: list[dict]) -> plt.Figure:
    """Acceptance rate and step size over training (MCMC-based models)."""
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    rows = [s for s in steps if "accept_rate" in s]
    a1.plot([s["step"] for s in rows], [s["accept_rate"] for s in rows], lw=0.7)
    a1.set_ylabel("acceptance rate")
    a1.set_ylim(-0.02, 1.02)
    rows = [s for s in steps if "step_size" in s]
    a2.semilogy([s["step"] for s in rows], [s["step_size"] for s in rows], lw=0.7)
    a2.set_ylabel("step size")
    a2.set_xlabel("step")
    return fig
