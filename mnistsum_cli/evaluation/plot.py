"""Stage 4: loss and accuracy curves, confusion heatmaps and galleries of the evaluations (PNG).

Every input is checked before anything is drawn; the figures and the manifest are written into
a staged folder that replaces plots/ in one commit of the artifacts folder (store.py).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import LogLocator, MaxNLocator, StrMethodFormatter

from mnistsum_cli.data.mnist import Mnist
from mnistsum_cli.data.prepared import PreparedData
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.settings import TrainConfig, preset_matching
from mnistsum_cli.store.fingerprints import fingerprint_file, plot_inputs
from mnistsum_cli.store.locks import folder_lock
from mnistsum_cli.store.paths import MNIST_SET_OF_SPLIT, SPLITS, RunDir
from mnistsum_cli.store.schemas import EVALUATION, HISTORY, MODEL_META
from mnistsum_cli.store.transactions import commit
from mnistsum_cli.store.writes import json_bytes, replace_file, write_file
from mnistsum_cli.training.run import evaluates, model_meta, read_setup

HEADS = (("digit", "digit head"), ("sum", "sum head"))
GALLERY_SIZE = 48
WRONG_DIGIT_COLOUR = "firebrick"


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
) -> plt.Figure:
    """One column per (history key without its split, label): the train curve through the epochs
    (per step, raw and smoothed, when history.json has per-step records; else per epoch), val at
    the end of each epoch, the kept epoch, and the learning rate in a strip below. `zoom` (values in %):
    the y axis ends at 100 and starts just below the val values and the 10th percentile of the smoothed train curve,
    so that the last points of accuracy are not squeezed by the first steps' climb."""
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
        if log:
            axis.set_yscale("log")
        axis.set_title(label)
        axis.set_ylabel(ylabel)
        axis.yaxis.set_tick_params(labelleft=True)  # shared y: keep the numbers on every panel
        axis.legend(fontsize=8)
        lr_axis.set_ylabel("lr", fontsize=8)
        lr_axis.tick_params(labelsize=7)
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


def settings_caption(history: dict[str, Any], run_info: dict[str, Any]) -> str:
    """The settings a curve comes from: arch, preset (when the settings are one), epochs, batch,
    lr, and the device and precision config.json records (left out when it is unreadable)."""
    settings = history.get("config", {})
    try:
        named = preset_matching(TrainConfig.from_dict(settings))
    except (MnistsumError, TypeError):
        named = None
    parts = [
        f"arch {settings.get('arch', '?')}",
        f"preset {named}" if named else None,
        f"{settings.get('epochs', '?')} epochs",
        f"batch {settings.get('batch_size', '?')}",
        f"peak lr {settings.get('lr', '?')}",
        run_info.get("device"),
        run_info.get("precision"),
        f"{history['world_size']} processes" if history.get("world_size", 1) > 1 else None,
    ]
    return " · ".join(part for part in parts if part)


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
    """Misclassified rows: each image with its number, true and predicted digit and sum; a
    wrong digit is captioned in red, a right digit with a wrong sum in black."""
    rows = -(-len(examples) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(1.6 * columns, 1.9 * rows + 0.4), squeeze=False, layout="constrained"
    )
    for axis in axes.flat:
        axis.axis("off")
    for axis, example, image in zip(axes.flat, examples, images):
        axis.imshow(image, cmap="gray")
        digit_ok = example["predicted_digit"] == example["digit"]
        axis.set_title(
            f"+{example['number']}: digit {example['digit']}→{example['predicted_digit']}\n"
            f"sum {example['sum']}→{example['predicted_sum']}",
            fontsize=7,
            color="black" if digit_ok else WRONG_DIGIT_COLOUR,
        )
    figure.suptitle(title)
    figure.supxlabel(
        "red caption: the digit is wrong (and so the sum);  black caption: the digit is right, the sum is wrong",
        fontsize=8,
    )
    return figure


def current_evaluations(run: RunDir, force: bool) -> dict[str, dict[str, Any]]:
    """Evaluation files that belong to the current model (run.evaluates; all present ones, when forced)."""
    model_sha = fingerprint_file(run.model, MODEL_META)
    evaluations = {}
    for split in SPLITS:
        path = run.evaluation(split)
        if not path.exists():
            continue
        metrics = EVALUATION.read_json(path)
        if not evaluates(metrics, model_sha) and not force:
            raise MnistsumError(
                f"{path} evaluates another model than {run.model}: rerun `mnistsum evaluate --split {split}`"
                " (or pass --allow-mismatch)"
            )
        evaluations[split] = metrics
    return evaluations


def check_gallery_indices(run: RunDir, galleries: dict[str, list[dict[str, Any]]], mnist: Mnist) -> None:
    """Every misclassified image_index points into the MNIST set of its split (the schema
    cannot know the set's size; MNIST, loaded here, does)."""
    for split, examples in galleries.items():
        size = mnist.sizes[MNIST_SET_OF_SPLIT[split]]
        outside = [example["image_index"] for example in examples if example["image_index"] >= size]
        if outside:
            raise MnistsumError(
                f"{run.evaluation(split)}: misclassified image_index {outside[0]} is outside the MNIST "
                f"{MNIST_SET_OF_SPLIT[split]} set ({size} images): rerun `mnistsum evaluate --split {split}`"
            )


def plot(run: RunDir, force: bool = False, prepared: Optional[PreparedData] = None) -> list[Path]:
    """Check every input, draw every plot the artifacts allow, then publish them together as
    plots/; returns the paths written. The galleries need the images: without `prepared`
    there are none. Holds the artifacts folder's lock throughout."""
    with folder_lock(run.root, "plot", "--artifacts", create=False):
        return _plot(run, force, prepared)


def _plot(run: RunDir, force: bool, prepared: Optional[PreparedData]) -> list[Path]:
    history = HISTORY.read_json(run.history)
    meta = model_meta(run)
    if history["run_id"] != meta["run_id"] and not force:
        raise MnistsumError(
            f"{run.history} and {run.model} come from different training runs: rerun `mnistsum train` (or pass --allow-mismatch)"
        )
    evaluations = current_evaluations(run, force)
    galleries, mnist = {}, None
    if prepared is not None:
        galleries = {split: m["misclassified"][:GALLERY_SIZE] for split, m in evaluations.items() if m["misclassified"]}
        if galleries:
            mnist = prepared.mnist
            check_gallery_indices(run, galleries, mnist)
    inputs = plot_inputs(run)
    caption = settings_caption(history, read_setup(run))

    figures: dict[str, plt.Figure] = {}
    try:
        draw_all(figures, history, meta["arch"], caption, evaluations, galleries, mnist)
        with commit(run.root, "plot", "--artifacts") as change:
            staging = change.folder_of(run.plots)
            for name, figure in figures.items():
                write_file(staging / name, png_bytes(figure))
            write_file(staging / run.plots_manifest.name, json_bytes({"inputs": inputs, "files": list(figures)}))
    finally:
        for figure in figures.values():
            plt.close(figure)
    return [run.plots / name for name in figures]


def png_bytes(figure: plt.Figure, dpi: int = 120) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def draw_all(
    figures: dict[str, plt.Figure],
    history: dict[str, Any],
    arch: str,
    caption: str,
    evaluations: dict[str, dict[str, Any]],
    galleries: dict[str, list[dict[str, Any]]],
    mnist: Optional[Mnist],
) -> None:
    """Draw every figure into `figures` (file name → figure), so the caller can close them all."""
    figures["loss.png"] = curves(
        history,
        [("digit_loss", "digit head"), ("sum_loss", "sum head"), ("loss", "total (digit + sum)")],
        "cross-entropy (log scale)",
        f"Loss ({arch})",
        caption,
        log=True,
    )
    figures["accuracy.png"] = curves(
        history,
        [("digit_accuracy", "digit head"), ("sum_accuracy", "sum head")],
        "accuracy (%)",
        f"Accuracy ({arch})",
        caption,
        scale=100,
        share_y=True,
        zoom=True,
    )
    for split, metrics in evaluations.items():
        for head, label in HEADS:
            title = f"{label} confusion, {split} split (accuracy {100 * metrics[f'{head}_accuracy']:.2f}%)"
            figures[f"confusion_{head}_{split}.png"] = heatmap(metrics[f"{head}_confusion"], title)
    for split, examples in galleries.items():
        images = mnist.images[MNIST_SET_OF_SPLIT[split]][[example["image_index"] for example in examples]]
        title = (
            f"{split} rows with a wrong digit or sum: {len(examples)} of {evaluations[split]['misclassified_count']} "
            "(+number: true→predicted)"
        )
        figures[f"misclassified_{split}.png"] = gallery(examples, images, title)


# --------------------------------------------------------------------------- runs side by side


def compare_runs(histories: list[dict[str, Any]], labels: list[str], caption: str, out: Path) -> Path:
    """One figure of several runs: val accuracy of both heads at each epoch's end and the train
    loss through the epochs (smoothed per step where recorded), one colour per run; written
    atomically to `out`."""
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
    try:
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
                loss = np.array([row["train_loss"] for row in steps])
                axes[2].plot([row["epoch"] for row in steps], loss, alpha=0.15, linewidth=0.6, color=style["color"])
                axes[2].plot(
                    [row["epoch"] for row in steps], smoothed(loss, len(steps) // len(records)), linewidth=1.6, **style
                )
            else:
                axes[2].plot(epochs, [record["train_loss"] for record in records], "-o", markersize=3, **style)
        for axis, title, ylabel in (
            (axes[0], "val accuracy, digit head", "accuracy (%)"),
            (axes[1], "val accuracy, sum head", "accuracy (%)"),
            (axes[2], "train loss (digit + sum), smoothed per step", "cross-entropy (log scale)"),
        ):
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.set_ylabel(ylabel)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
        axes[2].set_yscale("log")
        for axis in axes:  # one epoch axis for all three, from the start of training
            axis.set_xlim(0, max(len(history["epochs"]) for history in histories) + 0.05)
        axes[0].legend(fontsize=8)
        figure.supxlabel(caption, fontsize=8, color="dimgrey")
        replace_file(out, png_bytes(figure, dpi=100))
    finally:
        plt.close(figure)
    return out
