"""`mnistsum compare`'s figure: several runs side by side, one colour per run, written
atomically to the PNG the command chose (runlist.compare_output)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from mnistsum_cli.evaluation.figures import plt, png_bytes, smoothed  # plt: pyplot on Agg
from mnistsum_cli.store.writes import replace_file

PANELS = (
    ("val accuracy, digit head", "accuracy (%)", "lower right"),
    ("val accuracy, sum head", "accuracy (%)", "lower right"),
    ("train loss (digit + sum), smoothed per step", "cross-entropy (log scale)", "upper right"),
)


def compare_runs(histories: list[dict[str, Any]], labels: list[str], caption: str, out: Path) -> Path:
    """compare_figure written atomically to `out`."""
    figure = compare_figure(histories, labels, caption)
    try:
        replace_file(out, png_bytes(figure, dpi=100))
    finally:
        plt.close(figure)
    return out


def compare_figure(histories: list[dict[str, Any]], labels: list[str], caption: str) -> plt.Figure:
    """One figure of several runs: val accuracy of both heads at each epoch's end and the train
    loss through the epochs (smoothed per step where recorded), one colour per run, each panel
    with its legend; the x axes start where the panel's first point is (epoch 1 for val, the
    first step for the loss)."""
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    try:
        last = max(len(history["epochs"]) for history in histories)
        per_step = False
        for colour, (history, label) in enumerate(zip(histories, labels)):
            records = history["epochs"]
            epochs = [record["epoch"] for record in records]
            style = {"color": f"C{colour}", "label": label}
            for axis, head in zip(axes[:2], ("digit", "sum")):
                axis.plot(
                    epochs, [100 * record[f"val_{head}_accuracy"] for record in records], "-s", markersize=5, **style
                )
            steps = [row for record in records for row in record.get("steps", [])]
            if steps:
                x = [row["epoch"] for row in steps]
                loss = np.array([row["train_loss"] for row in steps])
                axes[2].plot(x, loss, alpha=0.15, linewidth=0.6, color=style["color"])
                axes[2].plot(x, smoothed(loss, len(steps) // len(records)), linewidth=1.6, **style)
                per_step = True
            else:
                axes[2].plot(epochs, [record["train_loss"] for record in records], "-o", markersize=3, **style)
        for axis, (title, ylabel, legend_at) in zip(axes, PANELS):
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.set_ylabel(ylabel)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8, loc=legend_at)
        margin = 0.25 if last > 1 else 0.5  # a lone epoch still gets an axis of some width
        for axis in axes:
            axis.set_xlim(1 - margin, last + margin)
        if per_step:  # the first step is a fraction of an epoch in
            axes[2].set_xlim(0, last + 0.05)
        axes[2].set_yscale("log")
        figure.suptitle(f"{len(histories)} runs side by side: accuracy on the val split and training loss")
        figure.supxlabel(caption, fontsize=8, color="dimgrey")
    except BaseException:
        plt.close(figure)
        raise
    return figure
