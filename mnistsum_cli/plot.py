"""Stage 4: loss and accuracy curves, and confusion heatmaps of the evaluations (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mnistsum_cli.artifacts import (  # noqa: E402
    MNIST_SET_OF_SPLIT,
    MODEL_FORMAT,
    SPLITS,
    DataDir,
    RunDir,
    fingerprint_file,
    read_json,
    read_safetensors,
    write_atomic,
    write_json,
)
from mnistsum_cli.data import load_dataset  # noqa: E402
from mnistsum_cli.errors import MnistsumError  # noqa: E402
from mnistsum_cli.mnist import Mnist  # noqa: E402

HEADS = (("digit", "digit head"), ("sum", "sum head"))
GALLERY_SIZE = 48


def save_figure(figure: plt.Figure, path: Path) -> Path:
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
    return path


def curves(history: dict[str, Any], panels: list[tuple[str, str]], ylabel: str, title: str, scale: float = 1.0) -> plt.Figure:
    """One panel per (history key without its split, label): train and val lines over the epochs."""
    epochs = [record["epoch"] for record in history["epochs"]]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, layout="constrained")
    for axis, (key, label) in zip(axes[0], panels):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [record[f"{split}_{key}"] * scale for record in history["epochs"]]
            axis.plot(epochs, values, style, markersize=3, label=split)
        axis.axvline(history["best_epoch"], color="grey", linestyle="--", linewidth=1, label="kept epoch")
        axis.set_title(label)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    return figure


def heatmap(matrix: list[list[int]], title: str) -> plt.Figure:
    counts = np.asarray(matrix)
    size = len(counts)
    figure, axis = plt.subplots(figsize=(4 + 0.35 * size, 3.5 + 0.35 * size))
    image = axis.imshow(np.log1p(counts), cmap="Blues")
    for row in range(size):
        for col in range(size):
            if counts[row, col]:
                bright = np.log1p(counts[row, col]) > 0.6 * np.log1p(counts.max())
                axis.text(col, row, str(counts[row, col]), ha="center", va="center",
                          fontsize=7, color="white" if bright else "black")  # fmt: skip
    axis.set_xticks(range(size))
    axis.set_yticks(range(size))
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="log(1 + count)")
    return figure


def gallery(examples: list[dict[str, Any]], images: np.ndarray, title: str, columns: int = 8) -> plt.Figure:
    """Misclassified rows: each image with its number, true and predicted digit and sum."""
    rows = -(-len(examples) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False, layout="constrained")
    for axis in axes.flat:
        axis.axis("off")
    for axis, example, image in zip(axes.flat, examples, images):
        axis.imshow(image, cmap="gray")
        digit_ok = example["predicted_digit"] == example["digit"]
        axis.set_title(
            f"+{example['number']}: digit {example['digit']}→{example['predicted_digit']}\n"
            f"sum {example['sum']}→{example['predicted_sum']}",
            fontsize=7,
            color="black" if digit_ok else "firebrick",
        )
    figure.suptitle(title)
    return figure


def current_evaluations(run: RunDir, model_meta: dict[str, Any], force: bool) -> dict[str, dict[str, Any]]:
    """Evaluation files that belong to the current model (all present ones, when forced)."""
    model_sha = fingerprint_file(run.model)
    evaluations = {}
    for split in SPLITS:
        path = run.evaluation(split)
        if not path.exists():
            continue
        metrics = read_json(path, stage="evaluate")
        if metrics.get("model", {}).get("sha256") != model_sha and not force:
            raise MnistsumError(
                f"{path} evaluates another model than {run.model}: rerun `mnistsum evaluate --split {split}`"
                " (or pass --force)"
            )
        evaluations[split] = metrics
    return evaluations


def plot_inputs(run: RunDir) -> dict[str, Any]:
    """Fingerprints of what the plots are drawn from; plots/manifest.json keeps a copy."""
    return {
        "history": fingerprint_file(run.history) if run.history.exists() else None,
        "model": fingerprint_file(run.model) if run.model.exists() else None,
        "evaluations": {split: fingerprint_file(run.evaluation(split)) for split in SPLITS if run.evaluation(split).exists()},
    }


def plot(
    run: RunDir,
    force: bool = False,
    data: Optional[DataDir] = None,
    mnist_dir: Optional[Path] = None,
    mnist: Optional[Mnist] = None,
) -> list[Path]:
    """Draw every plot the artifacts allow; returns the paths written. The gallery needs the
    images: from `mnist` when already loaded, else through the dataset in `data`."""
    history = read_json(run.history, stage="train")
    _, model_meta = read_safetensors(run.model, stage="train", expected_format=MODEL_FORMAT, metadata_only=True)
    if history.get("run_id") != model_meta.get("run_id") and not force:
        raise MnistsumError(
            f"{run.history} and {run.model} come from different training runs: rerun `mnistsum train` (or pass --force)"
        )
    if not history.get("epochs"):
        raise MnistsumError(f"{run.history} has no epochs: rerun `mnistsum train`")
    arch = model_meta.get("arch", "?")
    written = [
        save_figure(
            curves(history, [("digit_loss", "digit head"), ("sum_loss", "sum head"), ("loss", "total (digit + sum)")],
                   "cross-entropy", f"Loss per epoch ({arch})"),  # fmt: skip
            run.plots / "loss.png",
        ),
        save_figure(
            curves(history, [("digit_accuracy", "digit head"), ("sum_accuracy", "sum head")], "accuracy (%)",
                   f"Accuracy per epoch ({arch})", scale=100),  # fmt: skip
            run.plots / "accuracy.png",
        ),
    ]
    evaluations = current_evaluations(run, model_meta, force)
    for split, metrics in evaluations.items():
        for head, label in HEADS:
            title = f"{label} confusion, {split} split (accuracy {100 * metrics[f'{head}_accuracy']:.2f}%)"
            written.append(save_figure(heatmap(metrics[f"{head}_confusion"], title), run.plots / f"confusion_{head}_{split}.png"))
    if data is not None and any(metrics["misclassified"] for metrics in evaluations.values()):
        _, mnist = load_dataset(data, mnist_dir, mnist)
        for split, metrics in evaluations.items():
            examples = metrics["misclassified"][:GALLERY_SIZE]
            if not examples:
                continue
            images = mnist.images[MNIST_SET_OF_SPLIT[split]][[example["image_index"] for example in examples]]
            title = (f"{split} rows with a wrong digit or sum: {len(examples)} of {metrics['misclassified_count']} "
                     "(+number: true→predicted)")  # fmt: skip
            written.append(save_figure(gallery(examples, images, title), run.plots / f"misclassified_{split}.png"))
    write_json(run.plots_manifest, {"inputs": plot_inputs(run), "files": [path.name for path in written]})
    return written
