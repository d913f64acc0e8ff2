"""The figures `mnistsum plot` draws, from values already read and checked: training curves,
confusion heatmaps and galleries of misclassified rows; and the PNG bytes of a figure.

Drawing only: no file is read or written here (plot.py and compare.py do that).
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import LogLocator, MaxNLocator, StrMethodFormatter

WRONG_COLOUR = "firebrick"  # a head's caption where that head is wrong


def smoothed(values: np.ndarray, points_per_epoch: int) -> np.ndarray:
    """A centred moving mean over a tenth of an epoch (shorter at the ends), so that the trend
    of noisy per-step values reads through."""
    window = max(1, points_per_epoch // 10)
    kernel = np.ones(window)
    return np.convolve(values, kernel, "same") / np.convolve(np.ones(len(values)), kernel, "same")


def curves(
    history: dict[str, Any],
    panels: list[tuple[str, str]],
    ylabel: str,
    title: str,
    caption: str,
    scale: float = 1.0,
    log: bool = False,
    share_y: bool = False,
    zoom: bool = False,
    legend_at: str = "upper right",
) -> plt.Figure:
    """One column per (history key without its split, label): the train curve through the epochs
    (per step, raw and smoothed, when history.json has per-step records; else per epoch), val at
    the end of each epoch, the kept epoch, and the learning rate in a strip below. `zoom` (values in %):
    the y axis ends at 100 and starts just below the val values and the 10th percentile of the smoothed train curve,
    so that the last points of accuracy are not squeezed by the first steps' climb. The legend
    sits at `legend_at` in every panel, so the eye finds it in the same place across them."""
    records = history["epochs"]
    steps = [row for record in records for row in record.get("steps", [])]
    figure, axes = plt.subplots(
        2,
        len(panels),
        figsize=(5 * len(panels), 5),
        squeeze=False,
        sharex=True,
        sharey="row" if share_y else False,
        gridspec_kw={"height_ratios": [4, 1]},
        layout="constrained",
    )
    epochs = np.array([record["epoch"] for record in records])
    bottoms: list[float] = []
    for column, (key, label) in enumerate(panels):
        axis, lr_axis = axes[0, column], axes[1, column]
        val = np.array([record[f"val_{key}"] for record in records]) * scale
        if steps:
            x = np.array([row["epoch"] for row in steps])
            train = np.array([row[f"train_{key}"] for row in steps]) * scale
            axis.plot(x, train, color="C0", alpha=0.25, linewidth=0.7, label="train, per step")
            trend = smoothed(train, len(steps) // len(records))
            axis.plot(x, trend, color="C0", linewidth=1.8, label="train, smoothed")
            if zoom:
                bottoms.append(min(float(np.percentile(trend, 10)), float(val.min())))
            lr_axis.plot(x, [row["lr"] for row in steps], color="C2", linewidth=1.2)
        else:  # history.json written before per-step records: one point per epoch
            train = np.array([record[f"train_{key}"] for record in records]) * scale
            axis.plot(epochs, train, "-o", color="C0", markersize=3, label="train (epoch mean)")
            lr_axis.plot(epochs, [record.get("lr_end", np.nan) for record in records], "o", color="C2", markersize=3)
        axis.plot(
            epochs,
            val,
            "s",
            color="C1",
            markersize=6,
            markeredgecolor="black",
            markeredgewidth=0.6,
            label="val (end of epoch)",
            zorder=3,
        )
        for strip in (axis, lr_axis):
            strip.axvline(
                history["best_epoch"],
                color="grey",
                linestyle="--",
                linewidth=1,
                label="kept epoch" if strip is axis else None,
            )
            strip.grid(alpha=0.3)
            strip.yaxis.set_tick_params(labelleft=True)  # shared y: keep the numbers on every panel
        if log:
            axis.set_yscale("log")
        axis.set_title(label)
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=8, loc=legend_at)
        lr_axis.set_ylabel("learning rate", fontsize=8)
        lr_axis.tick_params(labelsize=7)
        lr_axis.yaxis.set_major_locator(MaxNLocator(3))
        lr_axis.set_ylim(bottom=0)
        lr_axis.set_xlabel("epoch")
        lr_axis.set_xlim(0 if steps else 0.5, len(records) + (0.05 if steps else 0.5))
        lr_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in axes[0]:
        if bottoms:
            low = min(bottoms)
            axis.set_ylim(max(0.0, low - 0.1 * (100 - low)), 100.2)
    figure.suptitle(title + incomplete_note(history))
    figure.supxlabel(caption, fontsize=8, color="dimgrey")
    return figure


def incomplete_note(history: dict[str, Any]) -> str:
    """' (incomplete: 3 of 10 epochs)' for a run that stopped early, else ''."""
    done, planned = len(history["epochs"]), history.get("config", {}).get("epochs", 0)
    return f" (incomplete: {done} of {planned} epochs)" if done < planned else ""


def heatmap(matrix: list[list[int]], title: str) -> plt.Figure:
    """Counts on a log colour scale (empty cells blank); the colour bar is labelled in counts."""
    counts = np.asarray(matrix)
    size = len(counts)
    figure, axis = plt.subplots(figsize=(4 + 0.35 * size, 3.5 + 0.35 * size))
    colours = plt.get_cmap("Blues").with_extremes(bad="white")
    norm = LogNorm(vmin=1, vmax=max(10, int(counts.max())))
    image = axis.imshow(np.ma.masked_equal(counts, 0), cmap=colours, norm=norm)
    for row in range(size):
        for col in range(size):
            if counts[row, col]:
                bright = np.log(counts[row, col]) > 0.6 * np.log(norm.vmax)
                axis.text(
                    col,
                    row,
                    str(counts[row, col]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if bright else "black",
                )
    axis.set_xticks(range(size))
    axis.set_yticks(range(size))
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    bar = figure.colorbar(image, ax=axis, label="rows (log scale)")
    bar.ax.yaxis.set_major_locator(LogLocator(base=10))
    bar.ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    return figure


def gallery(examples: list[dict[str, Any]], images: np.ndarray, title: str, columns: int = 8) -> plt.Figure:
    """Misclassified rows: each image with its number and the two heads' answers, the digit
    head's above the image and the sum head's below, each red where that head is wrong. The
    sum head is a head of its own: it can be right where the digit head is wrong, and wrong
    where the digit head is right."""
    rows = -(-len(examples) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(1.6 * columns, 2.1 * rows + 0.5), squeeze=False, layout="constrained"
    )
    for axis in axes.flat[len(examples) :]:
        axis.axis("off")
    for axis, example, image in zip(axes.flat, examples, images):  # axes kept for the label below: no frame, no ticks
        axis.set_xticks([])
        axis.set_yticks([])
        axis.spines[:].set_visible(False)
        axis.imshow(image, cmap="gray")
        for place, head in ((axis.set_title, "digit"), (axis.set_xlabel, "sum")):
            right = example[f"predicted_{head}"] == example[head]
            number = f"+{example['number']}: " if head == "digit" else ""
            place(
                f"{number}{head} {example[head]}→{example[f'predicted_{head}']}",
                fontsize=7,
                color="black" if right else WRONG_COLOUR,
            )
    figure.suptitle(title)
    figure.supxlabel(
        "above each image the digit head, below it the sum head (true→predicted): red where that head is wrong, "
        "black where it is right",
        fontsize=8,
    )
    return figure


def png_bytes(figure: plt.Figure, dpi: int = 120) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()
