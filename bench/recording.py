"""What recording per-step metrics costs the training loop: train_epoch with the StepRecorder
against the same loop keeping only the epoch's totals (the loop before per-step records), side
by side in one process, interleaved A B B A ... so that a change in machine load hits both.

    MNISTSUM_MNIST_DIR=/work/shared/mnist python bench/recording.py [--rows N] [--repeats R]

Settings: the `cpu` preset, one epoch per measurement (its first epoch: warm-up, rising lr).
On a loaded machine whole epochs vary more than the difference, so the bookkeeping itself is
also timed: the recorder's add() against the running sum's, per step, interleaved.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

import mnistsum_cli.training.loop as train_module
from mnistsum_cli.data.mnist import MNIST_DIR_ENV, load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.settings import preset
from mnistsum_cli.store.paths import DataDir, RunDir
from mnistsum_cli.training.distributed import Group
from mnistsum_cli.training.loop import load_train_data, train
from mnistsum_cli.training.metrics import StepRecorder


class TotalsOnly:
    """The loop without per-step records: one running sum of the epoch's totals on the device."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.totals = torch.zeros(4, device=device)
        self.steps = steps

    def add(self, step: int, sums: torch.Tensor, lr: float) -> None:
        self.totals += sums

    def read(self, group: Group, batch_size: int, epoch: int) -> tuple[dict[str, float], list]:
        totals = group.all_reduce_sum(self.totals) / (self.steps * batch_size)
        digit_loss, sum_loss, digit_accuracy, sum_accuracy = totals.tolist()
        return {
            "train_digit_loss": digit_loss,
            "train_sum_loss": sum_loss,
            "train_loss": digit_loss + sum_loss,
            "train_digit_accuracy": digit_accuracy,
            "train_sum_accuracy": sum_accuracy,
        }, []


def timed_epoch(data, config, tmp: Path, totals_only: bool) -> float:
    """Seconds of train_epoch (the step loop and the epoch-end read) for one epoch."""
    seconds = []
    original = train_module.train_epoch

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = original(*args, **kwargs)
        seconds.append(time.perf_counter() - started)
        return result

    with mock.patch.object(train_module, "train_epoch", timed):
        if totals_only:
            with mock.patch.object(train_module, "StepRecorder", TotalsOnly):
                train(config, data, RunDir(Path(tempfile.mkdtemp(dir=tmp))), torch.device("cpu"))
        else:
            train(config, data, RunDir(Path(tempfile.mkdtemp(dir=tmp))), torch.device("cpu"))
    return seconds[0]


def bookkeeping_per_step(steps: int, repeats: int = 200) -> tuple[float, float]:
    """Median seconds per step of StepRecorder.add and of TotalsOnly.add, interleaved."""
    sums = torch.rand(4)
    times: dict[type, list[float]] = {StepRecorder: [], TotalsOnly: []}
    for repeat in range(repeats):
        for kind in (StepRecorder, TotalsOnly) if repeat % 2 == 0 else (TotalsOnly, StepRecorder):
            recorder = kind(steps, torch.device("cpu"))
            started = time.perf_counter()
            for step in range(steps):
                recorder.add(step, sums, 0.01)
            times[kind].append((time.perf_counter() - started) / steps)
    return statistics.median(times[StepRecorder]), statistics.median(times[TotalsOnly])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="training rows (prepare --limit; default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements of each variant")
    args = parser.parse_args()
    config = preset("cpu").with_overrides(epochs=1)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        mnist = load_mnist(resolve_source(Path(os.environ[MNIST_DIR_ENV])))
        prepare(mnist, PrepareOptions(limit=args.rows), DataDir(tmp / "data"))
        data = load_train_data(SplitData(DataDir(tmp / "data"), mnist=mnist), torch.device("cpu"))
        steps = len(data.train) // config.batch_size
        print(
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"cpu preset ({config.arch}, batch {config.batch_size}), {len(data.train)} rows = {steps} steps per epoch"
        )
        timed_epoch(data, config, tmp, totals_only=False)  # warm-up (allocator, kernels), not counted
        times: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(args.repeats):
            for totals_only in (False, True) if repeat % 2 == 0 else (True, False):
                times[totals_only].append(timed_epoch(data, config, tmp, totals_only))
            ratio = times[False][-1] / times[True][-1]
            print(
                f"repeat {repeat + 1}: recording {times[False][-1]:.3f} s, totals only {times[True][-1]:.3f} s, ratio {ratio:.4f}"
            )
    ratios = [a / b for a, b in zip(times[False], times[True])]
    print(
        f"median: recording {statistics.median(times[False]):.3f} s, totals only {statistics.median(times[True]):.3f} s; "
        f"per-repeat ratio median {statistics.median(ratios):.4f} (min {min(ratios):.4f}, max {max(ratios):.4f})"
    )
    recorder, totals = bookkeeping_per_step(steps)
    step = min(times[True]) / steps  # the fastest epoch: the smallest step time, the largest share
    print(
        f"bookkeeping per step: recorder {1e6 * recorder:.1f} us, running sum {1e6 * totals:.1f} us; "
        f"difference {100 * (recorder - totals) / step:+.3f} % of a step ({1e3 * step:.2f} ms in the fastest epoch)"
    )


if __name__ == "__main__":
    main()
