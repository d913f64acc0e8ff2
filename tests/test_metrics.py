"""Per-step training metrics: how many records an epoch gets, that they average to the epoch's
totals, and that they survive an interrupt and `--resume` without gaps or duplicates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mnistsum_cli.store.paths import RunDir
from mnistsum_cli.training.distributed import SINGLE_PROCESS
from mnistsum_cli.training.loop import TrainData, lr_at, train
from mnistsum_cli.training.metrics import StepRecorder, steps_per_point
from test_train import CONFIG, CPU, InterruptAfter, straight_run, train_data  # noqa: F401 (fixtures)

HEADS = ("digit", "sum")


def step_rows(run: RunDir) -> list[dict[str, Any]]:
    """The flat per-step table, read as a user would (pandas.json_normalize(epochs, "steps") gives the same)."""
    return [row for record in json.loads(run.history.read_text())["epochs"] for row in record["steps"]]


def recorded(
    steps: int, batch_size: int = 8, epoch: int = 0, seed: int = 0
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A recorder fed `steps` steps of random sums (losses times rows, correct counts)."""
    generator = torch.Generator().manual_seed(seed)
    recorder = StepRecorder(steps, CPU)
    for step in range(steps):
        losses = torch.rand(2, generator=generator) * 3 * batch_size
        correct = torch.randint(0, batch_size + 1, (2,), generator=generator).float()
        recorder.add(step, torch.cat([losses, correct]), lr=0.001 * (step + 1))
    return recorder.read(SINGLE_PROCESS, batch_size, epoch)


@pytest.mark.parametrize("steps, points", [(1, 1), (5, 5), (99, 99), (199, 199), (200, 100), (390, 130), (1001, 101)])
def test_points_per_epoch(steps: int, points: int) -> None:
    _, rows = recorded(steps)
    assert len(rows) == points
    assert rows[-1]["step"] == steps and rows[-1]["epoch"] == 1.0


@pytest.mark.parametrize("steps_per_epoch", [1, 7, 50, 99, 100, 101, 390, 5000])
def test_runs_of_100_steps_or_more_have_50_points_or_more(steps_per_epoch: int) -> None:
    for epochs in range(1, 101):
        total = steps_per_epoch * epochs
        if total >= 100:
            assert epochs * -(-steps_per_epoch // steps_per_point(steps_per_epoch)) >= 50, (steps_per_epoch, epochs)


@pytest.mark.parametrize("steps", [5, 250, 301])
def test_records_average_to_the_epoch_totals(steps: int) -> None:
    """Each record is the mean over its window: weighted by the window's steps, they give the totals."""
    totals, rows = recorded(steps, epoch=3)
    ends = [row["step"] - 3 * steps for row in rows]
    widths = [end - start for start, end in zip([0] + ends[:-1], ends)]
    for key in ("digit_loss", "sum_loss", "loss", "digit_accuracy", "sum_accuracy"):
        mean = sum(width * row[f"train_{key}"] for width, row in zip(widths, rows)) / steps
        assert mean == pytest.approx(totals[f"train_{key}"], rel=1e-5), key
    assert [row["epoch"] for row in rows] == pytest.approx([3 + end / steps for end in ends], rel=1e-6)
    assert rows[0]["lr"] == pytest.approx(0.001 * (widths[0] + 1) / 2)


def test_a_run_records_every_step(straight_run, train_data: TrainData) -> None:
    run, state, reporter = straight_run
    steps = reporter.started[0][2]
    rows = step_rows(run)
    assert [row["step"] for row in rows] == list(range(1, CONFIG.epochs * steps + 1))
    assert [row["epoch"] for row in rows] == pytest.approx(
        [step / steps for step in range(1, CONFIG.epochs * steps + 1)]
    )
    for row in rows:
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, CONFIG.epochs * steps, CONFIG), rel=1e-5)
        assert set(row) == {"step", "epoch", "lr"} | {f"train_{h}_{m}" for h in HEADS for m in ("loss", "accuracy")} | {
            "train_loss"
        }
    for record in state.history:  # one step per record here: the plain mean is the epoch's
        for key in ("digit_loss", "sum_loss", "digit_accuracy", "sum_accuracy"):
            mean = sum(row[f"train_{key}"] for row in record["steps"]) / steps
            assert mean == pytest.approx(record[f"train_{key}"], rel=1e-5), key
        for row in record["steps"]:  # 64 rows a step: accuracies are multiples of 1/64
            assert row["train_digit_accuracy"] * 64 == pytest.approx(round(row["train_digit_accuracy"] * 64), abs=1e-4)


def test_resume_continues_the_steps_without_gaps_or_duplicates(
    straight_run, train_data: TrainData, tmp_path: Path
) -> None:
    run_a, _, _ = straight_run
    run_b = RunDir(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(CONFIG, train_data, run_b, CPU, reporter=InterruptAfter(epoch=1))
    train(CONFIG, train_data, run_b, CPU, resume=True)
    assert step_rows(run_b) == step_rows(run_a)
