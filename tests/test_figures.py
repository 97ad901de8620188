"""The run figures show something: non-blank Gaussian images, held-out curves, discrete
label colours, the sampler's target line, and no backend change on import."""

import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

from pyro_lvm.cli import main
from pyro_lvm.experiments import figures as F

FAST = ["--latent-dim", "2", "--eval-samples", "5", "--no-progress"]


def _spread(png) -> float:
    """Standard deviation of the grey levels of a saved figure (0 for a blank one)."""
    img = matplotlib.image.imread(png)[..., :3].mean(-1)
    return float(img.std())


def test_to_images_with_a_gaussian_range_is_finite_and_spread():
    x = torch.randn(16, 64) * 3 + 5  # real-valued data far outside [0, 1]
    imgs = F.to_images(x, (1, 8, 8), (float("-inf"), float("inf")))
    assert np.isfinite(imgs).all()
    assert 0.0 <= imgs.min() and imgs.max() <= 1.0
    assert imgs.std() > 0.15  # a blank image has 0; the range maps ~99% of pixels inside


def test_display_range_prefers_a_finite_likelihood_range():
    ref = torch.randn(100)
    assert F.display_range((0.0, 1.0), ref) == (0.0, 1.0)
    lo, hi = F.display_range((float("-inf"), float("inf")), ref)
    assert -3.5 < lo < -1.5 and 1.5 < hi < 3.5  # the 0.5% / 99.5% quantiles of N(0, 1)


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gauss") / "run"
    args = ["train", "vae", "--likelihood", "gaussian", "--epochs", "2", "--validation", "200"]
    assert main(args + FAST + ["--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "name", ["samples.png", "reconstructions.png", "interpolation.png", "training.png"]
)
def test_gaussian_figures_have_non_blank_pixels(gaussian_run, name):
    assert _spread(gaussian_run / name) > 0.05


def test_training_curve_has_a_held_out_line(gaussian_run):
    history = json.loads((gaussian_run / "history.json").read_text())
    fig = F.training_curves(history["steps"], history["epochs"], "vae on digits, epoch 2")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "held out (validation)" in labels and "train, epoch mean" in labels
    held = next(line for line in fig.axes[0].get_lines() if line.get_label().startswith("held"))
    assert list(held.get_ydata()) == [h["val_loss"] for h in history["epochs"]]
    assert fig.axes[0].get_title() == "vae on digits, epoch 2"


def test_samples_figure_shows_means_and_draws_labelled():
    imgs = np.random.default_rng(0).random((16, 8, 8))
    fig = F.samples_figure(imgs, imgs[::-1], "m on d, epoch 3")
    titles = [ax.get_title() for ax in fig.axes]
    assert any("means" in t for t in titles) and any("samples" in t for t in titles)
    assert fig._suptitle.get_text() == "m on d, epoch 3"


def test_latent_scatter_gives_each_label_its_own_colour():
    z = torch.randn(300, 2)
    labels = torch.arange(300) % 10
    fig = F.latent_scatter(z, labels)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [str(i) for i in range(10)]
    colours = {tuple(c.get_facecolor()[0]) for c in fig.axes[0].collections}
    assert len(colours) == 10
    assert len(fig.axes) == 1  # no continuous colourbar


def test_sampler_trace_draws_the_target_acceptance():
    steps = [{"step": i, "accept_rate": 0.5, "step_size": 0.1, "move": 0.2} for i in range(5)]
    fig = F.sampler_trace(steps, target_accept_prob=0.574)
    assert len(fig.axes) == 3
    targets = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("target")]
    assert targets and targets[0].get_ydata()[0] == pytest.approx(0.574)


def test_importing_figures_leaves_the_backend_alone():
    code = (
        "import matplotlib, sys; matplotlib.use('svg');"
        "import pyro_lvm, pyro_lvm.cli;"
        "import pyro_lvm.experiments.figures;"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend();"
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
