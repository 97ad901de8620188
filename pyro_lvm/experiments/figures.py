"""The figures of a run: plot functions returning Figures, and :func:`write_figures`.

Every function builds a :class:`matplotlib.figure.Figure` directly, without
``matplotlib.pyplot``: nothing here selects a backend or registers figures with a GUI,
so importing this module (or :mod:`pyro_lvm`) inside a notebook leaves the notebook's
backend alone, and a Figure returned to Jupyter still displays. :func:`write_figures`
saves PNGs with the Agg canvas that :meth:`Figure.savefig` uses without a backend.

Image data are shown on one fixed intensity scale per run (:func:`display_range`): the
likelihood's data range where it is finite (Bernoulli ``[0, 1]``, discretized logistic
``[-1, 1]``), else the robust range of the test data (a Gaussian likelihood's range is
``(-inf, inf)``, which would map every pixel to one grey). Inputs, reconstructions,
means and samples share that scale, so their intensities compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = [
    "display_range",
    "to_images",
    "image_grid",
    "samples_figure",
    "reconstructions",
    "latent_scatter",
    "interpolation",
    "training_curves",
    "sampler_trace",
    "write_figures",
    "save_sample_grid",
    "figure_title",
]

#: at most this many classes get their own colour and legend entry in latent scatters
MAX_LEGEND_CLASSES = 20


def display_range(value_range, reference: torch.Tensor | None = None) -> tuple[float, float]:
    """The intensity range mapped to black..white.

    ``value_range`` (e.g. ``likelihood.data_range``) when both ends are finite; otherwise
    the 0.5% and 99.5% quantiles of ``reference`` (the test data), so that a few outliers
    do not wash the images out. Falls back to ``(0, 1)`` without usable reference data.
    """
    lo, hi = (float(v) for v in value_range)
    if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        return lo, hi
    if reference is not None:
        r = reference.detach().flatten().float().cpu()
        r = r[torch.isfinite(r)]
        if r.numel() > 0:
            if r.numel() > 1_000_000:  # torch.quantile's input limit; a subsample suffices
                r = r[torch.randperm(r.numel(), generator=torch.Generator().manual_seed(0))]
                r = r[:1_000_000]
            qlo, qhi = (float(q) for q in torch.quantile(r, torch.tensor([0.005, 0.995])))
            if qhi > qlo:
                return qlo, qhi
            return qlo - 0.5, qlo + 0.5
    return 0.0, 1.0


def to_images(x: torch.Tensor, image_shape, value_range=(0.0, 1.0)) -> np.ndarray:
    """Flattened data -> ``(N, H, W)`` or ``(N, H, W, C)`` arrays in [0, 1].

    A non-finite ``value_range`` (a Gaussian likelihood's) is replaced by the range of
    ``x`` itself (:func:`display_range`); pass one shared range for figures that compare
    several tensors.
    """
    lo, hi = display_range(value_range, x)
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


def _show(ax, canvas: np.ndarray) -> None:
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()


def image_grid(images: np.ndarray, nrow: int = 8, title: str = "") -> Figure:
    """A grid of images in [0, 1] (:func:`to_images`)."""
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    _show(ax, _tile(images, nrow))
    ax.set_title(title)
    return fig


def samples_figure(means: np.ndarray, samples: np.ndarray, title: str = "") -> Figure:
    r"""Decoder means :math:`\mathbb E[x \mid z]` beside draws :math:`x \sim p(x \mid z)`,
    for the same prior draws :math:`z \sim p(z)`.

    The means are what most papers show; the draws are what the model generates (with a
    pixel-independent likelihood they look noisy, which is the honest picture).
    """
    fig = Figure(figsize=(11, 5.8))
    nrow = max(1, int(round(math.sqrt(len(means)))))
    for i, (imgs, label) in enumerate(
        (
            (means, r"decoder means $E[x \mid z]$, $z \sim p(z)$"),
            (samples, r"samples $x \sim p(x \mid z)$, same $z$"),
        )
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        _show(ax, _tile(imgs, nrow))
        ax.set_title(label, fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def reconstructions(inputs: np.ndarray, recons: np.ndarray, title: str = "") -> Figure:
    """Test inputs (top row) above the decoder means at their encodings (bottom row)."""
    n = len(inputs)
    fig = Figure(figsize=(min(12, max(4, n)), 2.5))
    ax = fig.add_subplot()
    _show(ax, _tile(np.concatenate([inputs, recons]), 2))
    sub = "test inputs (top), reconstructions (bottom)"
    ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=10)
    return fig


def latent_scatter(z: torch.Tensor, labels: torch.Tensor | None = None, title: str = "") -> Figure:
    """Latent codes, one discrete colour per label; a PCA projection when
    ``latent_dim > 2``."""
    z = z.detach().cpu().float()
    xlabel, ylabel = "z1", "z2"
    if z.shape[1] > 2:
        centred = z - z.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        z = centred @ v[:2].T
        xlabel, ylabel = "PC1 of z", "PC2 of z"
    elif z.shape[1] == 1:
        z = torch.cat([z, torch.zeros_like(z)], 1)
    fig = Figure(figsize=(5.8, 5))
    ax = fig.add_subplot()
    classes = [] if labels is None else sorted(set(labels.cpu().tolist()))
    if not classes or len(classes) > MAX_LEGEND_CLASSES:
        ax.scatter(z[:, 0], z[:, 1], s=6, color="C0")
    else:
        import matplotlib

        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        lab = labels.cpu()
        for i, c in enumerate(classes):
            pts = z[lab == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, color=cmap(i), label=str(c))
        ax.legend(
            title="label",
            markerscale=2.5,
            fontsize=8,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "test-set encodings")
    return fig


def interpolation(rows: Sequence[np.ndarray], title: str = "") -> Figure:
    """Each row: decoder means on a straight line between two encoded test inputs."""
    n_rows = len(rows)
    fig = Figure(figsize=(8, 1 + n_rows))
    ax = fig.add_subplot()
    _show(ax, _tile(np.concatenate(list(rows)), n_rows))
    sub = "latent interpolation between test encodings"
    ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=10)
    return fig


def training_curves(steps: list[dict], history: list[dict], title: str = "") -> Figure:
    """Training loss per step and per epoch, and the held-out loss per epoch
    (``val_loss``, present with ``--validation``); all in nats per datapoint."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    if steps:
        ax.plot(
            [s["step"] for s in steps],
            [s["loss"] for s in steps],
            lw=0.5,
            alpha=0.45,
            color="C0",
            label="train, per step",
        )
    # an epoch's record sits at the step that ends it
    ends = _epoch_end_steps(steps, history)
    if history:
        ax.plot(
            ends,
            [h["train_loss"] for h in history],
            "o-",
            ms=3,
            color="C0",
            label="train, epoch mean",
        )
        held = [(e, h["val_loss"]) for e, h in zip(ends, history) if "val_loss" in h]
        if held:
            ax.plot(*zip(*held), "s-", ms=3, color="C3", label="held out (validation)")
            best = min(held, key=lambda p: p[1] if math.isfinite(p[1]) else math.inf)
            ax.axvline(best[0], color="C3", lw=0.6, ls=":", label=f"best held out {best[1]:.4g}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per datapoint)")
    _robust_ylim(ax, [s["loss"] for s in steps] + [h["train_loss"] for h in history])
    ax.set_title(title or "training")
    if steps or history:
        ax.legend(fontsize=8)
    return fig


def _epoch_end_steps(steps: list[dict], history: list[dict]) -> list[float]:
    if not history:
        return []
    per_epoch = len(steps) / len(history) if steps else 1.0
    return [h["epoch"] * per_epoch for h in history]


def _robust_ylim(ax, values: list[float]) -> None:
    """Keep a first-step spike (the untrained model) from flattening the curve."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)])
    if v.size < 20:
        return
    lo, hi = np.quantile(v, [0.0, 0.98])
    if hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.15 * (hi - lo))


def sampler_trace(
    steps: list[dict], target_accept_prob: float | None = None, title: str = ""
) -> Figure:
    r"""MCMC diagnostics over training: acceptance (with the adaptation target), step
    size, and how far the chain moves per transition (``move``: the root-mean-square
    change of the chain state, 0 for a rejection, when the driver reports it)."""
    has_move = any("move" in s for s in steps)
    fig = Figure(figsize=(6.5, 7 if has_move else 5))
    axes = fig.subplots(3 if has_move else 2, 1, sharex=True)
    rows = [s for s in steps if "accept_rate" in s]
    axes[0].plot([s["step"] for s in rows], [s["accept_rate"] for s in rows], lw=0.7)
    if target_accept_prob is not None:
        axes[0].axhline(
            target_accept_prob, color="C3", ls="--", lw=0.8, label=f"target {target_accept_prob:g}"
        )
        axes[0].legend(fontsize=8)
    axes[0].set_ylabel("acceptance rate")
    axes[0].set_ylim(-0.02, 1.02)
    rows = [s for s in steps if "step_size" in s and s["step_size"] > 0]
    axes[1].semilogy([s["step"] for s in rows], [s["step_size"] for s in rows], lw=0.7)
    axes[1].set_ylabel("step size")
    if has_move:
        rows = [s for s in steps if "move" in s]
        axes[2].plot([s["step"] for s in rows], [s["move"] for s in rows], lw=0.7)
        axes[2].set_ylabel("RMS chain move\nper transition")
    axes[-1].set_xlabel("step")
    axes[0].set_title(title or "sampler")
    return fig


def figure_title(model: str | None, dataset: str | None, epoch: int | None) -> str:
    """``"MODEL on DATASET, epoch E"`` from whichever parts are known."""
    head = " on ".join(p for p in (model, dataset) if p)
    tail = f"epoch {epoch}" if epoch is not None else ""
    return ", ".join(p for p in (head, tail) if p)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _sample_images(lvm, num: int, vrange, image_shape) -> tuple[np.ndarray, np.ndarray]:
    """Decoder means and draws for the same prior samples (models with the
    ``decoder``/``likelihood``/``prior`` protocol), else ``generate`` twice."""
    if all(hasattr(lvm, a) for a in ("prior", "decoder", "likelihood")):
        params = lvm.decoder(lvm.prior(num).sample())
        means = lvm.likelihood.mean(params)
        draws = lvm.likelihood(params).sample()
    else:
        means = draws = lvm.generate(num)
    return to_images(means, image_shape, vrange), to_images(draws, image_shape, vrange)


def save_sample_grid(x: torch.Tensor, data, experiment, path: Path, title: str = "") -> None:
    """A grid of already-drawn samples ``x`` (``pyro-lvm sample``) on the run's scale."""
    vrange = display_range(experiment.lvm.likelihood.data_range, data.test_x)
    _save(image_grid(to_images(x, data.image_shape, vrange), title=title or "samples"), path)


@torch.no_grad()
def write_figures(experiment, data, state, out: Path, title: str = "") -> list[Path]:
    """The standard figures of a trained run, as PNGs in ``out``; returns their paths.

    ``training.png`` (train and held-out curves), ``sampler.png`` for MCMC-trained models
    (acceptance with its target, step size, move per step), ``latent.png`` (test
    encodings by label), and for image data ``samples.png`` (means beside draws),
    ``reconstructions.png`` and ``interpolation.png``. ``title`` (e.g.
    :func:`figure_title`) heads every figure.
    """
    out = Path(out)
    lvm = experiment.lvm
    device = next(experiment.modules.parameters()).device
    written = [_save(training_curves(state.steps, state.history, title), out / "training.png")]
    if any("accept_rate" in s for s in state.steps):
        target = experiment.info.get("target_accept_prob")
        written.append(_save(sampler_trace(state.steps, target, title), out / "sampler.png"))
    test_x = data.test_x.to(device)
    try:
        z = lvm.encode(test_x)
    except NotImplementedError:
        z = None
    if z is not None:
        fig = latent_scatter(z.float(), data.test_y, title)
        written.append(_save(fig, out / "latent.png"))
    if data.image_shape is None:
        return written
    vrange = display_range(lvm.likelihood.data_range, data.test_x)
    shape = data.image_shape
    means, draws = _sample_images(lvm, 64, vrange, shape)
    written.append(_save(samples_figure(means, draws, title), out / "samples.png"))
    if z is not None:
        x = test_x[:16]
        fig = reconstructions(
            to_images(x, shape, vrange), to_images(lvm.reconstruct(x), shape, vrange), title
        )
        written.append(_save(fig, out / "reconstructions.png"))
        t = torch.linspace(0, 1, 10, device=device).unsqueeze(-1)
        rows = []
        for a in range(0, min(8, len(z) - 1), 2):
            b = a + 1
            line = ((1 - t) * z[a] + t * z[b]).to(z.dtype)
            rows.append(to_images(lvm.likelihood.mean(lvm.decoder(line)), shape, vrange))
        written.append(_save(interpolation(rows, title), out / "interpolation.png"))
    return written
