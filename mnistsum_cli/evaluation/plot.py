"""Stage 4: loss and accuracy curves, confusion heatmaps and galleries of the evaluations (PNG).

Every input is checked before anything is drawn; the figures and the manifest are written into
a staged folder that replaces plots/ in one commit of the artifacts folder (store.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mnistsum_cli.data.mnist import Mnist
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.evaluation.figures import curves, gallery, heatmap, plt, png_bytes
from mnistsum_cli.settings import TrainConfig, preset_matching
from mnistsum_cli.store.fingerprints import fingerprint_file, plot_inputs
from mnistsum_cli.store.locks import folder_lock
from mnistsum_cli.store.paths import MNIST_SET_OF_SPLIT, SPLITS, RunDir
from mnistsum_cli.store.schemas import EVALUATION, HISTORY, MODEL_META
from mnistsum_cli.store.transactions import commit
from mnistsum_cli.store.writes import json_bytes, write_file
from mnistsum_cli.training.run import evaluates, model_meta, read_setup
from mnistsum_cli.training.runlist import column_in_words

HEADS = (("digit", "digit head"), ("sum", "sum head"))
GALLERY_SIZE = 48


def settings_caption(history: dict[str, Any], setup: dict[str, Any]) -> str:
    """The settings a curve comes from, in words: arch, preset (when the settings are one),
    epochs, batch, lr, and the device and precision config.json records (left out when it is
    unreadable)."""
    settings = history.get("config", {})
    try:
        named = preset_matching(TrainConfig.from_dict(settings))
    except (MnistsumError, TypeError):
        named = None
    parts = [
        column_in_words("arch", settings.get("arch")),
        f"preset {named}" if named else None,
        *(column_in_words(name, settings.get(name)) for name in ("epochs", "batch_size", "lr")),
        *(column_in_words(name, setup.get(name)) for name in ("device", "precision")),
        f"{history['world_size']} processes" if history.get("world_size", 1) > 1 else None,
    ]
    return " · ".join(part for part in parts if part)


def current_evaluations(folder: RunDir, force: bool) -> dict[str, dict[str, Any]]:
    """Evaluation files that belong to the current model (run.evaluates; all present ones, when forced)."""
    model_sha = fingerprint_file(folder.model, MODEL_META)
    evaluations = {}
    for split in SPLITS:
        path = folder.evaluation(split)
        if not path.exists():
            continue
        metrics = EVALUATION.read_json(path)
        if not evaluates(metrics, model_sha) and not force:
            raise MnistsumError(
                f"{path} evaluates another model than {folder.model}: rerun `mnistsum evaluate --split {split}`"
                " (or pass --allow-mismatch)"
            )
        evaluations[split] = metrics
    return evaluations


def check_gallery_indices(folder: RunDir, galleries: dict[str, list[dict[str, Any]]], mnist: Mnist) -> None:
    """Every misclassified image_index points into the MNIST set of its split (the schema
    cannot know the set's size; MNIST, loaded here, does)."""
    for split, examples in galleries.items():
        size = mnist.sizes[MNIST_SET_OF_SPLIT[split]]
        outside = [example["image_index"] for example in examples if example["image_index"] >= size]
        if outside:
            raise MnistsumError(
                f"{folder.evaluation(split)}: misclassified image_index {outside[0]} is outside the MNIST "
                f"{MNIST_SET_OF_SPLIT[split]} set ({size} images): rerun `mnistsum evaluate --split {split}`"
            )


def plot(folder: RunDir, force: bool = False, prepared: Optional[SplitData] = None) -> list[Path]:
    """Check every input, draw every plot the artifacts allow, then publish them together as
    plots/; returns the paths written. The galleries need the images: without `prepared`
    there are none. Holds the artifacts folder's lock throughout."""
    with folder_lock(folder.root, "plot", "--artifacts", create=False):
        return _plot(folder, force, prepared)


def _plot(folder: RunDir, force: bool, prepared: Optional[SplitData]) -> list[Path]:
    history = HISTORY.read_json(folder.history)
    meta = model_meta(folder)
    if history["run_id"] != meta["run_id"] and not force:
        raise MnistsumError(
            f"{folder.history} and {folder.model} come from different training runs: rerun `mnistsum train` (or pass --allow-mismatch)"
        )
    evaluations = current_evaluations(folder, force)
    galleries, mnist = {}, None
    if prepared is not None:
        galleries = {split: m["misclassified"][:GALLERY_SIZE] for split, m in evaluations.items() if m["misclassified"]}
        if galleries:
            mnist = prepared.mnist
            check_gallery_indices(folder, galleries, mnist)
    inputs = plot_inputs(folder)
    caption = settings_caption(history, read_setup(folder))

    figures: dict[str, plt.Figure] = {}
    try:
        draw_all(figures, history, meta["arch"], caption, evaluations, galleries, mnist)
        with commit(folder.root, "plot", "--artifacts") as change:
            staging = change.folder_of(folder.plots)
            for name, figure in figures.items():
                write_file(staging / name, png_bytes(figure))
            write_file(staging / folder.plots_manifest.name, json_bytes({"inputs": inputs, "files": list(figures)}))
    finally:
        for figure in figures.values():
            plt.close(figure)
    return [folder.plots / name for name in figures]


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
        legend_at="upper right",  # the losses fall: the top right empties first
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
        legend_at="lower right",  # the accuracies rise to the top right
    )
    for split, metrics in evaluations.items():
        for head, label in HEADS:
            title = f"{label} confusion, {split} split (accuracy {100 * metrics[f'{head}_accuracy']:.2f}%)"
            figures[f"confusion_{head}_{split}.png"] = heatmap(metrics[f"{head}_confusion"], title)
    for split, examples in galleries.items():
        images = mnist.images[MNIST_SET_OF_SPLIT[split]][[example["image_index"] for example in examples]]
        title = (
            f"{split} rows with a wrong digit or sum: {len(examples)} of {evaluations[split]['misclassified_count']}"
        )
        figures[f"misclassified_{split}.png"] = gallery(examples, images, title)
