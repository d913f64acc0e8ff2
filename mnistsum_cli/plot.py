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
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, StrMethodFormatter  # noqa: E402

from mnistsum_cli.errors import MnistsumError  # noqa: E402
from mnistsum_cli.fingerprints import fingerprint_file, plot_inputs
from mnistsum_cli.mnist import Mnist  # noqa: E402
from mnistsum_cli.paths import MNIST_SET_OF_SPLIT, MODEL_FORMAT, SPLITS, RunDir  # noqa: E402
from mnistsum_cli.prepared import PreparedData  # noqa: E402
from mnistsum_cli.schemas import EVALUATION, HISTORY, MODEL_META  # noqa: E402
from mnistsum_cli.store import commit, folder_lock, json_bytes, write_file  # noqa: E402
from mnistsum_cli.tensorfiles import read_safetensors  # noqa: E402

HEADS = (("digit", "digit head"), ("sum", "sum head"))
GALLERY_SIZE = 48
WRONG_DIGIT_COLOUR = "firebrick"


def curves(
    history: dict[str, Any], panels: list[tuple[str, str]], ylabel: str, title: str, scale: float = 1.0, share_y: bool = False
) -> plt.Figure:
    """One panel per (history key without its split, label): train and val lines over the epochs."""
    epochs = [record["epoch"] for record in history["epochs"]]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=share_y, layout="constrained"
    )
    for axis, (key, label) in zip(axes[0], panels):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [record[f"{split}_{key}"] * scale for record in history["epochs"]]
            axis.plot(epochs, values, style, markersize=3, label=split)
        axis.axvline(history["best_epoch"], color="grey", linestyle="--", linewidth=1, label="kept epoch")
        axis.set_title(label)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(ylabel)
        axis.yaxis.set_tick_params(labelleft=True)  # shared y: keep the numbers on every panel
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title + incomplete_note(history))
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
                axis.text(col, row, str(counts[row, col]), ha="center", va="center",
                          fontsize=7, color="white" if bright else "black")  # fmt: skip
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
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows + 0.4), squeeze=False, layout="constrained")
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


def current_evaluations(run: RunDir, model_meta: dict[str, Any], force: bool) -> dict[str, dict[str, Any]]:
    """Evaluation files that belong to the current model (all present ones, when forced)."""
    model_sha = fingerprint_file(run.model)
    evaluations = {}
    for split in SPLITS:
        path = run.evaluation(split)
        if not path.exists():
            continue
        metrics = EVALUATION.read_json(path)
        if metrics["model"]["sha256"] != model_sha and not force:
            raise MnistsumError(
                f"{path} evaluates another model than {run.model}: rerun `mnistsum evaluate --split {split}`"
                " (or pass --force)"
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
    _, model_meta = read_safetensors(run.model, stage="train", expected_format=MODEL_FORMAT, metadata_only=True)
    MODEL_META.check(model_meta, run.model)
    if history["run_id"] != model_meta["run_id"] and not force:
        raise MnistsumError(
            f"{run.history} and {run.model} come from different training runs: rerun `mnistsum train` (or pass --force)"
        )
    evaluations = current_evaluations(run, model_meta, force)
    galleries, mnist = {}, None
    if prepared is not None:
        galleries = {split: m["misclassified"][:GALLERY_SIZE] for split, m in evaluations.items() if m["misclassified"]}
        if galleries:
            mnist = prepared.mnist
            check_gallery_indices(run, galleries, mnist)
    inputs = plot_inputs(run)

    figures: dict[str, plt.Figure] = {}
    try:
        draw_all(figures, history, model_meta["arch"], evaluations, galleries, mnist)
        with commit(run.root, "plot", "--artifacts") as change:
            staging = change.folder_of(run.plots)
            for name, figure in figures.items():
                write_file(staging / name, png_bytes(figure))
            write_file(staging / run.plots_manifest.name, json_bytes({"inputs": inputs, "files": list(figures)}))
    finally:
        for figure in figures.values():
            plt.close(figure)
    return [run.plots / name for name in figures]


def png_bytes(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def draw_all(
    figures: dict[str, plt.Figure],
    history: dict[str, Any],
    arch: str,
    evaluations: dict[str, dict[str, Any]],
    galleries: dict[str, list[dict[str, Any]]],
    mnist: Optional[Mnist],
) -> None:
    """Draw every figure into `figures` (file name → figure), so the caller can close them all."""
    figures["loss.png"] = curves(
        history, [("digit_loss", "digit head"), ("sum_loss", "sum head"), ("loss", "total (digit + sum)")],
        "cross-entropy", f"Loss per epoch ({arch})",
    )  # fmt: skip
    figures["accuracy.png"] = curves(
        history, [("digit_accuracy", "digit head"), ("sum_accuracy", "sum head")], "accuracy (%)",
        f"Accuracy per epoch ({arch})", scale=100, share_y=True,
    )  # fmt: skip
    for split, metrics in evaluations.items():
        for head, label in HEADS:
            title = f"{label} confusion, {split} split (accuracy {100 * metrics[f'{head}_accuracy']:.2f}%)"
            figures[f"confusion_{head}_{split}.png"] = heatmap(metrics[f"{head}_confusion"], title)
    for split, examples in galleries.items():
        images = mnist.images[MNIST_SET_OF_SPLIT[split]][[example["image_index"] for example in examples]]
        title = (f"{split} rows with a wrong digit or sum: {len(examples)} of {evaluations[split]['misclassified_count']} "
                 "(+number: true→predicted)")  # fmt: skip
        figures[f"misclassified_{split}.png"] = gallery(examples, images, title)
