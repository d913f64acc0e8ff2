"""Stage 3: measure both heads of a trained model on a split."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.data.tensors import SplitTensors, split_tensors
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.diskfiles import read_file
from mnistsum_cli.store.fingerprints import fingerprint_bytes, now_iso
from mnistsum_cli.store.locks import folder_lock
from mnistsum_cli.store.paths import NUM_DIGITS, NUM_SUMS, RunDir
from mnistsum_cli.store.schemas import EVALUATION, MAX_MISCLASSIFIED, MODEL_META
from mnistsum_cli.store.splits import Dataset
from mnistsum_cli.store.transactions import write_json
from mnistsum_cli.store.writes import json_bytes
from mnistsum_cli.training.checkpoint import load_model_bytes
from mnistsum_cli.training.inference import EVAL_PRECISION, predict


def check_model_matches(model_meta: dict[str, Any], dataset: Dataset, force: bool) -> None:
    """Refuse weights trained on another dataset, unless forced."""
    if model_meta.get("dataset_id") != dataset.dataset_id and not force:
        raise MnistsumError(
            "the model was trained on another dataset than the one in the data folder: "
            "rerun `mnistsum train`, or pass --allow-mismatch to evaluate it anyway"
        )


def confusion(true: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """[classes, classes] counts; rows are true classes, columns predictions."""
    return torch.bincount(true * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def evaluate(model: torch.nn.Module, split_name: str, split: SplitTensors, image_index: np.ndarray) -> dict[str, Any]:
    """All metrics of one split as a JSON-able dict."""
    predictions = predict(model, split)
    digit_pred, sum_pred = predictions.digit, predictions.sum
    digit_confusion = confusion(split.digits, digit_pred, NUM_DIGITS).cpu()
    sum_confusion = confusion(split.sums, sum_pred, NUM_SUMS).cpu()
    wrong = ((digit_pred != split.digits) | (sum_pred != split.sums)).nonzero().flatten()
    rows = wrong[:MAX_MISCLASSIFIED]
    per_digit = digit_confusion.diag() / digit_confusion.sum(dim=1).clamp(min=1)
    columns = {
        "row": rows.tolist(),
        "image_index": image_index[rows.tolist()].tolist(),
        "number": split.numbers[rows].tolist(),
        "digit": split.digits[rows].tolist(),
        "sum": split.sums[rows].tolist(),
        "predicted_digit": digit_pred[rows].tolist(),
        "predicted_sum": sum_pred[rows].tolist(),
        "digit_confidence": predictions.digit_probs[rows].max(dim=1).values.tolist(),
        "sum_confidence": predictions.sum_probs[rows].max(dim=1).values.tolist(),
    }
    misclassified = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return {
        "split": split_name,
        "rows": len(split),
        "device": str(split.images.device),
        "precision": EVAL_PRECISION,
        "digit_accuracy": (digit_pred == split.digits).float().mean().item(),
        "sum_accuracy": (sum_pred == split.sums).float().mean().item(),
        "digit_loss": predictions.digit_loss.mean().item(),
        "sum_loss": predictions.sum_loss.mean().item(),
        "consistency": (sum_pred == digit_pred + split.numbers).float().mean().item(),
        "per_digit_accuracy": {str(digit): value for digit, value in enumerate(per_digit.tolist())},
        "digit_confusion": digit_confusion.tolist(),
        "sum_confusion": sum_confusion.tolist(),
        "misclassified_count": len(wrong),
        "misclassified": misclassified,
    }


def check_finite_losses(metrics: dict[str, Any], model_path: Path) -> None:
    """Refuse to record the losses of weights that are not finite numbers (a NaN loss means NaN
    or infinite logits: the accuracies of such a model mean nothing, and JSON holds no NaN)."""
    for name in ("digit_loss", "sum_loss"):
        if not math.isfinite(metrics[name]):
            raise MnistsumError(
                f"{model_path} gives a {metrics['split']} {name.replace('_', ' ')} of {metrics[name]}: its weights "
                "are not finite numbers; rerun `mnistsum train`"
            )


def provenance(model_path: Path, model_sha: str, model_meta: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
    """What an evaluation was made from, so later stages can tell when it is stale."""
    return {
        "model": {
            "path": str(model_path),
            "sha256": model_sha,
            "run_id": model_meta.get("run_id"),
            "arch": model_meta.get("arch"),
            "epoch": model_meta.get("epoch"),
            "dataset_id": model_meta.get("dataset_id"),
        },
        "dataset_id": dataset.dataset_id,
        "created_at": now_iso(),
    }


def evaluate_model(
    split: str, prepared: SplitData, folder: RunDir, device: torch.device, force: bool = False
) -> dict[str, Any]:
    """The `evaluate` stage: rebuild the model from safetensors, measure, write the JSON (holding
    the artifacts folder's lock throughout, so that the model cannot change under it)."""
    with folder_lock(folder.root, "evaluate", "--artifacts", create=False):
        data = read_file(folder.model, MODEL_META.max_bytes, "train")  # once: the hash is of the weights measured
        model, meta = load_model_bytes(data, folder.model, device)
        dataset, mnist = prepared.dataset, prepared.mnist
        check_model_matches(meta, dataset, force)
        rows = dataset.splits[split]
        metrics = evaluate(model, split, split_tensors(dataset, mnist, split, device), rows.image_index)
        check_finite_losses(metrics, folder.model)
        metrics.update(provenance(folder.model, fingerprint_bytes(data), meta, dataset))
        previous = unchanged_evaluation(folder.evaluation(split), metrics)
        if previous is not None:
            return previous
        write_json(folder.evaluation(split), metrics)
    return metrics


def unchanged_evaluation(path: Path, metrics: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The evaluation in `path` when it says all that `metrics` says but when (created_at), else
    None: re-evaluating an unchanged model then rewrites nothing, so the plots drawn from the file
    (whose manifest records its fingerprint) stay current."""
    if not path.exists():
        return None
    try:
        previous = read_file(path, EVALUATION.max_bytes, "evaluate")
        created_at = json.loads(previous).get("created_at")
    except (MnistsumError, ValueError, AttributeError):
        return None  # unreadable: written afresh
    same = {**metrics, "created_at": created_at}
    return same if json_bytes(same) == previous else None
