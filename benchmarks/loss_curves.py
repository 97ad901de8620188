"""Epoch-loss curves of finished runs, with each run's worst rise over its best epoch.

Reads ``history.json`` of every run folder given (for instance the ``lae-seedS`` folders of
two ``pyro-lvm compare`` outputs), prints a markdown table (best / final epoch loss and
the largest rise of an epoch mean over the best earlier epoch, from epoch 16 on, as
``docs/langevin.md`` reports it) and draws one panel per label.

    python benchmarks/loss_curves.py --label default runs/table-digits/lae-seed* \
        --label jacobian runs/table-digits-jac/lae-seed* --out docs/lae_loss_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def epoch_losses(run: Path) -> list[float]:
    """The per-epoch mean training losses of a finished run."""
    history = json.loads((run / "history.json").read_text())
    return [float(e["train_loss"]) for e in history["epochs"]]


def worst_rise(losses: list[float], start: int = 16) -> tuple[float, int]:
    """The largest ``loss[t] - min(loss[:t])`` for ``t >= start`` and its (1-based) epoch."""
    rises = [(losses[t] - min(losses[:t]), t + 1) for t in range(start, len(losses))]
    return max(rises) if rises else (0.0, 0)


def _groups(argv: list[str]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    label = None
    it = iter(argv)
    for token in it:
        if token == "--label":
            label = next(it)
            groups[label] = []
        elif label is None:
            raise SystemExit("loss_curves.py: give --label NAME before the run folders")
        else:
            groups[label].append(Path(token))
    return groups


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="loss_curves.png")
    args, rest = parser.parse_known_args(argv)
    groups = _groups(rest)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.5), squeeze=False)
    rows = {}
    print("| label | run | best epoch loss | final | worst rise (epoch) |")
    print("|---|---|---|---|---|")
    for ax, (label, runs) in zip(axes[0], groups.items()):
        top = bottom = None
        for run in runs:
            losses = epoch_losses(run)
            # the first epochs' losses would flatten the rest of the curve
            top = max(losses[5:] + ([top] if top is not None else []))
            bottom = min(losses + ([bottom] if bottom is not None else []))
            rise, epoch = worst_rise(losses)
            rows[f"{label}/{run.name}"] = {
                "best": min(losses),
                "final": losses[-1],
                "worst_rise": rise,
                "worst_rise_epoch": epoch,
            }
            print(
                f"| {label} | {run.name} | {min(losses):.2f} | {losses[-1]:.2f} | "
                f"{rise:.1f} ({epoch}) |"
            )
            ax.plot(range(1, len(losses) + 1), losses, label=run.name)
        ax.set_ylim(bottom - 2, top + 2)
        ax.set(title=label, xlabel="epoch", ylabel="training loss (epoch mean)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
