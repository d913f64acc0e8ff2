"""Per-step training metrics: kept on the device while an epoch runs, read back once at its end.

The step loop hands each step's sums (losses times rows, correct predictions) to a
StepRecorder, which copies them into one row of a device buffer: no host sync. At the end of
the epoch the buffer is summed over the ranks (under torchrun) and read back in one transfer;
the epoch's totals are its column sums, and the per-step records are means over windows of
`steps_per_point` steps. The records go into history.json (each epoch record's "steps"), so
they are saved, resumed and checked for staleness with the rest of the run.
"""

from __future__ import annotations

from typing import Any

import torch

from mnistsum_cli.training.distributed import Group

# The buffer's columns, in the order the step loop stacks them.
SUMS = ("digit_loss", "sum_loss", "digit_correct", "sum_correct")
POINTS_PER_EPOCH = 100  # at least this many records per epoch (every step when fewer steps)
DIGITS = 6  # significant digits kept in history.json


def steps_per_point(steps: int) -> int:
    """How many steps one record averages: 1 up to 199 steps an epoch, so that every epoch has
    between 100 and 200 records (or one per step) and history.json stays small."""
    return max(1, steps // POINTS_PER_EPOCH)


def _rounded(value: float) -> float:
    return float(f"{value:.{DIGITS}g}")


class StepRecorder:
    """One epoch's per-step sums on the training device."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.sums = torch.zeros(steps, len(SUMS), device=device)
        self.lrs: list[float] = []

    def add(self, step: int, sums: torch.Tensor, lr: float) -> None:
        """Store step `step`'s sums (a device tensor ordered as SUMS) and its learning rate."""
        self.sums[step].copy_(sums)
        self.lrs.append(lr)

    def read(self, group: Group, batch_size: int, epoch: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The epoch's train totals and its per-step records, over all ranks (one all-reduce,
        one transfer). `epoch` counts from 0; a record's step counts from 1 over the run and
        its epoch is fractional (1.0 is the end of the first epoch)."""
        sums = group.all_reduce_sum(self.sums).cpu().double()
        steps = len(sums)
        digit_loss, sum_loss, digit_accuracy, sum_accuracy = (sums.sum(0) / (steps * batch_size)).tolist()
        totals = {
            "train_digit_loss": digit_loss,
            "train_sum_loss": sum_loss,
            "train_loss": digit_loss + sum_loss,
            "train_digit_accuracy": digit_accuracy,
            "train_sum_accuracy": sum_accuracy,
        }
        width = steps_per_point(steps)
        ends = list(range(width, steps, width)) + [steps]
        starts = [0] + ends[:-1]
        windows = torch.stack(
            [sums[start:end].sum(0) / ((end - start) * batch_size) for start, end in zip(starts, ends)]
        )
        records = []
        for start, end, (d_loss, s_loss, d_acc, s_acc) in zip(starts, ends, windows.tolist()):
            records.append(
                {
                    "step": epoch * steps + end,
                    "epoch": round(epoch + end / steps, 6),
                    "lr": _rounded(sum(self.lrs[start:end]) / (end - start)),
                    "train_digit_loss": _rounded(d_loss),
                    "train_sum_loss": _rounded(s_loss),
                    "train_loss": _rounded(d_loss + s_loss),
                    "train_digit_accuracy": _rounded(d_acc),
                    "train_sum_accuracy": _rounded(s_acc),
                }
            )
        return totals, records
