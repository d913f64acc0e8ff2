"""The `predict` command: image files (brought to MNIST form by data.images) or a row of a
prepared split, answered by the run's model on either runtime: torch through the one inference
path (training.inference.head_probabilities), or model.onnx on onnxruntime (onnx_runtime.py).

torch is imported by the functions that run it, never at the top: image files are read and
refused before it loads, and `predict --runtime onnx` on image files runs without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from mnistsum_cli.data.images import image_file_in_mnist_form
from mnistsum_cli.data.splitdata import SplitData, check_row
from mnistsum_cli.store.paths import MNIST_SET_OF_SPLIT, RunDir

if TYPE_CHECKING:
    import torch
    from torch import nn


def predict_digits(
    model: nn.Module, images: torch.Tensor, numbers: torch.Tensor, device: torch.device
) -> list[dict[str, int | float]]:
    """Digit and sum predictions with their probabilities (see inference.head_probabilities)."""
    from mnistsum_cli.training.inference import head_probabilities

    digit_probs, sum_probs = head_probabilities(model, images, numbers, device)
    # through tolist, the one host read of a GPU's (or a simulated GPU's) results
    return predictions(*(np.asarray(probs.tolist(), dtype=np.float32) for probs in (digit_probs, sum_probs)))


def predictions(digit_probs: np.ndarray, sum_probs: np.ndarray) -> list[dict[str, int | float]]:
    """Each row's most likely digit and sum with their probabilities, as plain JSON values,
    from the heads' probabilities [N, 10] and [N, 19] of either runtime."""
    digit, total = digit_probs.argmax(axis=1), sum_probs.argmax(axis=1)
    rows = np.arange(len(digit))
    digit_conf, sum_conf = digit_probs[rows, digit], sum_probs[rows, total]
    return [
        {"digit": d, "sum": s, "digit_confidence": dc, "sum_confidence": sc}
        for d, s, dc, sc in zip(digit.tolist(), total.tolist(), digit_conf.tolist(), sum_conf.tolist())
    ]


def predict_files(
    paths: list[Path], number: int, folder: RunDir, device: Optional[torch.device], runtime: str = "torch"
) -> list[dict[str, Any]]:
    """The `predict` command on image files: one result per file, with its path and the runtime
    that answered (`device` is torch's; onnx runs on the CPU)."""
    answer = model_runner(folder, device, runtime)
    images = np.stack([image_file_in_mnist_form(path) for path in paths])
    results = answer(images, np.full(len(paths), number, dtype=np.int64))
    return [
        {"image": str(path), "number": number, **result, "runtime": runtime} for path, result in zip(paths, results)
    ]


def model_runner(
    folder: RunDir, device: Optional[torch.device], runtime: str
) -> Callable[[np.ndarray, np.ndarray], list[dict[str, int | float]]]:
    """The run's model on `runtime` (torch: model.safetensors on `device`; onnx: a current
    model.onnx on onnxruntime, without torch), as a function from uint8 images [N, 28, 28] and
    int64 numbers [N] to `predictions`; the model is read now, so its errors come first."""
    if runtime == "onnx":
        from mnistsum_cli.evaluation.onnx_runtime import load_onnx_model

        onnx_model = load_onnx_model(folder)
        return lambda images, numbers: predictions(*onnx_model.probabilities(images, numbers))
    import torch

    from mnistsum_cli.training.checkpoint import load_model

    model, _ = load_model(folder.model, device)
    return lambda images, numbers: predict_digits(model, torch.from_numpy(images), torch.from_numpy(numbers), device)


def predict_row(
    index: int,
    split: str,
    number: Optional[int],
    prepared: SplitData,
    folder: RunDir,
    device: Optional[torch.device],
    runtime: str = "torch",
) -> dict[str, Any]:
    """The `predict` command on row `index` of a prepared split (its number unless one is given).
    MNIST is read through torchvision, so this loads torch whatever the runtime."""
    answer = model_runner(folder, device, runtime)
    dataset, mnist = prepared.dataset, prepared.mnist
    rows = dataset.splits[split]
    check_row(index, split, len(rows))
    number = int(rows.number[index]) if number is None else number
    image = mnist.images[MNIST_SET_OF_SPLIT[split]][int(rows.image_index[index])]
    result = answer(image[None], np.array([number], dtype=np.int64))[0]
    true_sum = int(rows.digit[index]) + number
    return {
        "split": split,
        "row": index,
        "number": number,
        "true_digit": int(rows.digit[index]),
        "true_sum": true_sum,
        **result,
        "runtime": runtime,
    }
