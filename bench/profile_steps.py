"""A few training steps of a preset under torch.profiler: GPU kernels per step, the share of the
steps' wall time the GPU is busy, and the top kernels, so that the next optimisation (CUDA
graphs, torch.compile, fused augmentation) is chosen on evidence. On the CPU (a smoke test) the
same figures come from the CPU ops.

The steps are the package's own `train()` loop: a Reporter starts the profiler at the first
step and advances its schedule at every step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from mnistsum_cli.data.mnist import load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.settings import PRESETS, preset
from mnistsum_cli.store.paths import DataDir, RunDir
from mnistsum_cli.training.devices import select_device
from mnistsum_cli.training.loop import load_train_data, train

TOP = 10


class ProfilingReporter:
    """train()'s Reporter: skips `warmup` steps (cuDNN autotuning, allocator growth), then
    profiles `steps` steps and times them between two device synchronisations."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
            on_trace_ready=self._keep,
        )
        self.events: Optional[list] = None
        self.seconds: Optional[float] = None
        self._done, self._started = 0, 0.0

    def epoch_start(self, epoch: int, epochs: int, steps: int, batch_size: int) -> None:
        if steps < self.warmup + self.steps:
            raise SystemExit(
                f"an epoch has {steps} steps, fewer than {self.warmup} + {self.steps}: lower --warmup/--steps or the batch size"
            )
        self.batch_size = batch_size
        self.profiler.start()

    def step(self) -> None:
        self._done += 1
        if self._done == self.warmup:
            self._synchronize()
            self._started = time.perf_counter()
        if self._done == self.warmup + self.steps:
            self._synchronize()
            self.seconds = time.perf_counter() - self._started
        self.profiler.step()

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.profiler.stop()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _keep(self, finished: profile) -> None:
        self.events = list(finished.events())


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals, in the intervals' unit."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarise(events: list, steps: int, seconds: float, batch_size: int, on_gpu: bool) -> dict[str, Any]:
    """Kernels (GPU) or aten ops (CPU) per step, the GPU's busy share of the wall time, the top ones."""
    if on_gpu:
        chosen = [e for e in events if e.device_type == DeviceType.CUDA]
        times = {id(e): e.time_range.end - e.time_range.start for e in chosen}
    else:
        chosen = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
        times = {id(e): e.self_cpu_time_total for e in chosen}
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in chosen:
        totals[event.name][0] += 1
        totals[event.name][1] += times[id(event)]
    all_us = sum(total for _, total in totals.values()) or 1.0
    top = sorted(totals.items(), key=lambda item: -item[1][1])[:TOP]
    busy = busy_seconds([(e.time_range.start, e.time_range.end) for e in chosen]) / 1e6 if on_gpu else None
    return {
        "what": "CUDA kernels and copies" if on_gpu else "CPU aten ops (no GPU)",
        "steps": steps,
        "batch_size": batch_size,
        "step_ms": 1e3 * seconds / steps,
        "images_per_second": steps * batch_size / seconds,
        "per_step": len(chosen) / steps,
        "gpu_busy_share": None if busy is None else busy / seconds,
        "top": [
            {"name": name[:120], "per_step": count / steps, "ms_per_step": total / 1e3 / steps, "share": total / all_us}
            for name, (count, total) in top
        ],
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpu", type=int, metavar="N", help="CUDA device N (default: cuda:0 when there is one)")
    where.add_argument("--cpu", action="store_true", help="run on the CPU")
    parser.add_argument("--mnist-dir", type=Path, required=True, help="torchvision MNIST root")
    parser.add_argument("--limit", type=int, help="rows per split, for quick runs")
    parser.add_argument("--preset", default="default", choices=list(PRESETS), help="(default: default)")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before profiling (default: 5)")
    parser.add_argument("--steps", type=int, default=5, help="steps profiled (default: 5)")
    parser.add_argument("--json-out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device, _ = select_device(args.gpu, args.cpu)
    config = preset(args.preset).with_overrides(epochs=1, batch_size=args.batch_size)
    reporter = ProfilingReporter(device, args.warmup, args.steps)
    with tempfile.TemporaryDirectory(prefix="mnistsum-profile-") as tmp:
        data_dir = DataDir(Path(tmp) / "data")
        mnist = load_mnist(resolve_source(args.mnist_dir))
        prepare(mnist, PrepareOptions(seed=0, limit=args.limit), data_dir)
        train(
            config,
            load_train_data(SplitData(data_dir, mnist=mnist), device),
            RunDir(Path(tmp) / "run"),
            device,
            reporter=reporter,
        )
    figures = {
        "device": str(device),
        "preset": args.preset,
        "torch": torch.__version__,
        **summarise(reporter.events or [], args.steps, reporter.seconds, reporter.batch_size, device.type == "cuda"),
    }
    args.json_out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({key: value for key, value in figures.items() if key != "top"}))
    for row in figures["top"]:
        print(f"  {row['ms_per_step']:8.3f} ms/step  {row['per_step']:5.1f}x  {row['name']}")


if __name__ == "__main__":
    sys.exit(main())
