"""Running a model over a split: batched, in eval mode and fp32, the same for validation,
`evaluate` and `predict`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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
