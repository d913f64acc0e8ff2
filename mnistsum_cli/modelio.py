"""Running a model over a split, and saving / rebuilding models from safetensors alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnistsum_cli import __version__
from mnistsum_cli.artifacts import MODEL_FORMAT, read_safetensors, write_safetensors
from mnistsum_cli.data import SplitTensors, normalise
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.models import build_model
from mnistsum_cli.schemas import MODEL_META

EVAL_BATCH_SIZE = 2048
EVAL_PRECISION = "fp32"  # validation, evaluate and predict never autocast: one precision, one answer


@dataclass(frozen=True)
class Predictions:
    """Per-row outputs of a model on a split (on the split's device)."""

    digit_probs: torch.Tensor  # [N, 10]
    sum_probs: torch.Tensor  # [N, 19]
    digit_loss: torch.Tensor  # [N] cross-entropy
    sum_loss: torch.Tensor  # [N]

    @property
    def digit(self) -> torch.Tensor:
        return self.digit_probs.argmax(dim=1)

    @property
    def sum(self) -> torch.Tensor:
        return self.sum_probs.argmax(dim=1)


@torch.no_grad()
def predict(model: nn.Module, split: SplitTensors, batch_size: int = EVAL_BATCH_SIZE) -> Predictions:
    """Run the model in eval mode over a whole split, batch by batch, in fp32, with no host syncs."""
    was_training = model.training
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {"digit_probs": [], "sum_probs": [], "digit_loss": [], "sum_loss": []}
    for start in range(0, len(split), batch_size):
        rows = slice(start, start + batch_size)
        digit_logits, sum_logits = model(normalise(split.images[rows]), split.numbers[rows])
        outputs["digit_probs"].append(digit_logits.softmax(dim=1))
        outputs["sum_probs"].append(sum_logits.softmax(dim=1))
        outputs["digit_loss"].append(nn.functional.cross_entropy(digit_logits, split.digits[rows], reduction="none"))
        outputs["sum_loss"].append(nn.functional.cross_entropy(sum_logits, split.sums[rows], reduction="none"))
    model.train(was_training)
    return Predictions(**{name: torch.cat(parts) for name, parts in outputs.items()})


def save_model(path: Path, model: nn.Module, metadata: dict[str, Any]) -> None:
    """Weights plus everything needed to rebuild the model (arch) and to trace it (metadata)."""
    meta = {"format": MODEL_FORMAT, "package_version": __version__, **metadata}
    write_safetensors(path, model.state_dict(), meta)


def load_model(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from model.safetensors: weights + metadata, no pickle."""
    tensors, meta = read_safetensors(path, stage="train", expected_format=MODEL_FORMAT)
    model = build_model(MODEL_META.check(meta, path)["arch"])
    load_weights(model, tensors, path, meta["arch"])
    return model.to(device).eval(), meta


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Copy saved weights into `model`; missing, extra or misshapen tensors (weights of another
    architecture, or damage) are one line naming the first mismatch."""
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:  # "Error(s) in loading state_dict for X:" then one line per mismatch
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        reason = lines[1] if len(lines) > 1 else lines[0]
        raise MnistsumError(f"{path} does not fit architecture {arch!r} ({reason}): rerun `mnistsum train`") from None
