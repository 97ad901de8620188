"""The figure of ``pyro-lvm compare``: one panel per metric, a column per model."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_comparison"]

#: the panels, when present (the rest of COMPARE_KEYS are in compare.md)
PANELS = ("test_nelbo_per_dim", "test_nll_ais_per_dim", "sample_frechet", "ms_per_step")


def plot_comparison(
    results: list[dict], table: dict[str, dict[str, tuple]], path: str | Path
) -> Path:
    """Each seed as a dot and the mean +- std as a bar, per model and metric.

    ``table`` is :func:`~pyro_lvm.experiments.compare.summarize` of ``results``:
    ``{model: {key: (mean, std, n)}}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in PANELS if any(k in row for row in table.values())]
    models = list(table)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 3))
    axes = [axes] if len(panels) <= 1 else list(axes)
    for ax, key in zip(axes, panels):
        for i, model in enumerate(models):
            values = [r[key] for r in results if r["model"] == model and r.get(key) is not None]
            ax.plot([i] * len(values), values, "o", color="0.5", markersize=3)
            if key in table[model]:
                mean, sd, _ = table[model][key]
                ax.errorbar(i, mean, yerr=sd, fmt="_", color="C0", markersize=14, capsize=4)
        ax.set_xticks(range(len(models)), models, rotation=30)
        ax.set_title(key, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
