"""Running a model: the one inference path, for validation, `evaluate`, `predict` and `serve`.

Every answer a model gives goes through head_logits: eval mode, normalised pixels, no autograd,
fp32 (never autocast: one precision, one answer). head_probabilities answers a batch of
MNIST-form images (predict, serve); predict runs a whole split batch by batch (validation,
evaluate), with the losses.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mnistsum_cli.data.images import check_model_inputs
from mnistsum_cli.data.tensors import SplitTensors, normalise

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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then as it was. A model in eval mode already (as
    load_model returns it, as serve holds it) is left alone: switching walks every module (0.3 ms
    a request)."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


@torch.no_grad()
def head_logits(model: nn.Module, images: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The digit [N, 10] and sum [N, 19] logits, in fp32, of uint8 images [N, 28, 28] and numbers
    [N] on the model's device; the caller holds the model in eval mode (eval_mode)."""
    digit_logits, sum_logits = model(normalise(images), numbers)
    return digit_logits.float(), sum_logits.float()


def head_probabilities(
    model: nn.Module, images: torch.Tensor, numbers: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities of the digit head [N, 10] and the sum head [N, 19] for uint8 images
    [N, 28, 28] and int64 numbers [N] in 0-9 (checked: images.check_model_inputs), moved to
    `device`, where the model must live."""
    check_model_inputs(images, numbers)
    with eval_mode(model):
        digit_logits, sum_logits = head_logits(model, images.to(device), numbers.to(device))
    return digit_logits.softmax(dim=1), sum_logits.softmax(dim=1)


def predict(model: nn.Module, split: SplitTensors, batch_size: int = EVAL_BATCH_SIZE) -> Predictions:
    """Run the model over a whole split (on its device), batch by batch, with no host syncs."""
    outputs: dict[str, list[torch.Tensor]] = {"digit_probs": [], "sum_probs": [], "digit_loss": [], "sum_loss": []}
    with eval_mode(model):
        for start in range(0, len(split), batch_size):
            rows = slice(start, start + batch_size)
            digit_logits, sum_logits = head_logits(model, split.images[rows], split.numbers[rows])
            outputs["digit_probs"].append(digit_logits.softmax(dim=1))
            outputs["sum_probs"].append(sum_logits.softmax(dim=1))
            outputs["digit_loss"].append(
                nn.functional.cross_entropy(digit_logits, split.digits[rows], reduction="none")
            )
            outputs["sum_loss"].append(nn.functional.cross_entropy(sum_logits, split.sums[rows], reduction="none"))
    return Predictions(**{name: torch.cat(parts) for name, parts in outputs.items()})
