"""Time to target test accuracy: the classic pipeline against mnistsum's presets, on one device.

The classic pipeline is the conv/BatchNorm classifier design as it was trained: DataLoader-fed,
per-item transforms, Adam, fp32.

All runs train on the rows of one `prepare` run (same images, same random numbers) and are
scored on the same test split after every epoch, with the clock stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torchvision
from PIL import Image
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from mnistsum_cli.data.mnist import MNIST_DIR_ENV, Mnist, load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.data.tensors import SplitTensors, split_tensors
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.settings import PRESETS, TrainConfig, preset
from mnistsum_cli.store.paths import MNIST_SET_OF_SPLIT, DataDir, RunDir
from mnistsum_cli.store.splits import Dataset, Split
from mnistsum_cli.training.checkpoint import load_weights, model_weights, read_checkpoint
from mnistsum_cli.training.devices import select_device
from mnistsum_cli.training.inference import predict
from mnistsum_cli.training.loop import load_train_data, train
from mnistsum_cli.training.models import ARCHITECTURES, build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSIC = "classic pipeline"
# what --preset, --target and --baseline-epochs default to, per mode
MODES: dict[str, dict[str, Any]] = {
    "default": {"presets": ["default"], "target": 0.985, "baseline_epochs": 10},
    # the previous and the current `cpu` preset to 99 %; the classic pipeline (~5 min an epoch
    # on two cores) is capped, so its speed-ups are lower bounds
    "cpu": {"presets": ["cpu-v1", "cpu"], "target": 0.99, "baseline_epochs": 1},
}
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)  # logs: no wrapping at 80


class Clock:
    """Training seconds summed over epochs, and the peak GPU memory while the clock ran."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        self.seconds, self.peak_bytes, self._started = 0.0, None, 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)  # so test evaluations do not count
        self._started = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes or 0, torch.cuda.max_memory_allocated(self.device))
        self.seconds += time.perf_counter() - self._started


@dataclass(frozen=True)
class Target:
    """The test accuracy each head must reach."""

    digit: float
    sum: float

    def reached(self, epoch: dict[str, float]) -> bool:
        return epoch["digit"] >= self.digit and epoch["sum"] >= self.sum

    def __str__(self) -> str:
        return f"{self.digit:.1%} digit and {self.sum:.1%} sum"


@dataclass
class RunResult:
    name: str
    settings: dict[str, Any]
    test: SplitTensors
    epochs: list[dict[str, float]] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    images: int = 0  # training images seen, all epochs

    def score(self, clock: Clock, model: nn.Module, images: int) -> None:
        """Record an epoch of `images` training images: cumulative training seconds and the
        model's test accuracies."""
        self.images += images
        predictions = predict(model, self.test)
        digit = (predictions.digit == self.test.digits).sum().item() / len(self.test)
        total = (predictions.sum == self.test.sums).sum().item() / len(self.test)
        self.epochs.append({"epoch": len(self.epochs) + 1, "seconds": clock.seconds, "digit": digit, "sum": total})
        self.peak_bytes = clock.peak_bytes
        console.print(
            f"  {self.name} epoch {len(self.epochs)}: {clock.seconds:.1f} s, digit {digit:.2%}, sum {total:.2%}"
        )

    def summary(self, target: Target) -> dict[str, Any]:
        reached = next((e for e in self.epochs if target.reached(e)), None)
        last = self.epochs[-1]
        return {
            "name": self.name,
            "settings": self.settings,
            "epochs": self.epochs,
            "train_seconds": last["seconds"],
            "images_per_second": self.images / last["seconds"],
            "target_epoch": reached["epoch"] if reached else None,
            "time_to_target": reached["seconds"] if reached else None,
            "final_digit_accuracy": last["digit"],
            "final_sum_accuracy": last["sum"],
            "peak_gpu_memory_bytes": self.peak_bytes,
        }


def speedup(base: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Reference time over run time to the target; a bound when only one of them got there."""
    b, r = base["time_to_target"], run["time_to_target"]
    if b is not None and r is not None:
        return {"value": b / r, "bound": "="}
    if r is not None:
        return {"value": base["train_seconds"] / r, "bound": ">="}
    if b is not None:
        return {"value": b / run["train_seconds"], "bound": "<="}
    return {"value": None, "bound": None}


def add_speedups(summaries: list[dict[str, Any]]) -> None:
    """Each run's speed-up over the classic pipeline (when it ran) and over the first preset."""
    classic = [s for s in summaries if s["name"] == CLASSIC]
    presets = [s for s in summaries if s["name"] != CLASSIC]
    for s in presets:
        if classic:
            s["speedup"] = speedup(classic[0], s)
        if s is not presets[0]:
            s["speedup_vs_first"] = speedup(presets[0], s)


def speedup_text(summary: dict[str, Any], key: str = "speedup") -> str:
    if key not in summary:
        return "-"  # the reference run itself
    value, bound = summary[key]["value"], summary[key]["bound"]
    return "n/a" if value is None else f"{'' if bound == '=' else bound}{value:.2f}x"


def epoch_text(summary: dict[str, Any], index: int) -> str:
    if index >= len(summary["epochs"]):
        return ""
    e = summary["epochs"][index]
    return f"{e['seconds']:.1f} · {100 * e['digit']:.2f} / {100 * e['sum']:.2f}"


# --------------------------------------------------------------------------- the classic pipeline


class ClassicMnist(torchvision.datasets.MNIST):
    """The classic dataset: a PIL image through per-item transforms, the number one-hot, two
    targets; the rows (image, number) come from our Parquet split, so the data equals mnistsum's."""

    def __init__(self, root: Path, rows: Split) -> None:
        per_item = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        train = MNIST_SET_OF_SPLIT[rows.name] == "train"
        super().__init__(str(root), train=train, download=False, transform=per_item)
        self.rows = rows

    @property
    def raw_folder(self) -> str:  # torchvision would look in <root>/ClassicMnist/raw
        return os.path.join(self.root, "MNIST", "raw")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.data[int(self.rows.image_index[i])].numpy())
        number = nn.functional.one_hot(torch.tensor(int(self.rows.number[i])), 10).float()
        return self.transform(image), number, int(self.rows.digit[i]), int(self.rows.sum[i])


def run_classic(
    args: argparse.Namespace, dataset: Dataset, mnist: Mnist, device: torch.device, result: RunResult
) -> None:
    """The conv/BatchNorm classifier design as it was trained: DataLoader, Adam 1e-3, fp32."""
    torch.backends.cudnn.benchmark = False  # the design's default
    torch.manual_seed(args.seed)
    train_set = ClassicMnist(mnist.root, dataset.splits["train"])
    drop_last = len(train_set) % args.batch_size == 1  # BatchNorm1d cannot train on one row
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed),
        drop_last=drop_last,
    )
    model = build_model("convnet").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    clock = Clock(device)
    for _ in range(args.baseline_epochs):
        clock.start()
        model.train()
        for images, numbers, digits, sums in loader:
            images, numbers, digits, sums = images.to(device), numbers.to(device), digits.to(device), sums.to(device)
            digit_logits, sum_logits = model(images, numbers.argmax(1))  # ConvNetSum one-hots inside
            loss = nn.functional.cross_entropy(digit_logits, digits) + nn.functional.cross_entropy(sum_logits, sums)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        clock.stop()
        result.score(clock, model, len(train_set) - drop_last)


# --------------------------------------------------------------------------- mnistsum


def checkpoint_model(run: RunDir, device: torch.device) -> torch.nn.Module:
    """The model as the last saved epoch left it (model.safetensors holds the best epoch instead),
    for scoring a run while it trains."""
    tensors, meta = read_checkpoint(run.checkpoint)
    config = TrainConfig.from_dict(meta["config"])
    model = build_model(config.arch)
    load_weights(model, model_weights(tensors), run.checkpoint, config.arch)
    return model.to(device)


class TimingReporter:
    """train()'s Reporter: times each epoch, then scores the checkpoint it has just saved."""

    def __init__(self, run: RunDir, device: torch.device, result: RunResult) -> None:
        self.run, self.result, self.clock = run, result, Clock(device)
        self.images = 0

    def epoch_start(self, epoch: int, epochs: int, steps: int, batch_size: int) -> None:
        self.images = steps * batch_size
        self.clock.start()

    def step(self) -> None:
        pass

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.clock.stop()
        self.result.score(self.clock, checkpoint_model(self.run, self.clock.device), self.images)


def run_mnistsum(
    config: TrainConfig, data_dir: DataDir, mnist: Mnist, device: torch.device, result: RunResult, tmp: Path
) -> None:
    train_data = load_train_data(SplitData(data_dir, mnist=mnist), device)
    run = RunDir(Path(tempfile.mkdtemp(prefix="run-", dir=tmp)))
    train(config, train_data, run, device, reporter=TimingReporter(run, device, result))


# --------------------------------------------------------------------------- output


def print_tables(summaries: list[dict[str, Any]], target: Target) -> None:
    per_epoch = Table(
        "epoch",
        *(s["name"] for s in summaries),
        box=box.SIMPLE_HEAD,
        title="cumulative training s · test digit / sum accuracy, %",
    )
    for i in range(max(len(s["epochs"]) for s in summaries)):
        per_epoch.add_row(str(i + 1), *(epoch_text(s, i) for s in summaries))
    console.print(per_epoch)

    with_classic = any(s["name"] == CLASSIC for s in summaries)
    first_preset = next(s["name"] for s in summaries if s["name"] != CLASSIC)
    several = sum(s["name"] != CLASSIC for s in summaries) > 1
    columns = ["run", "to target", "digit %", "sum %", "train s", "images/s", "peak GPU"]
    columns += ["vs classic"] * with_classic + [f"vs {first_preset.removeprefix('mnistsum ')}"] * several
    title = f"time to {target} test accuracy; speed-up = reference time / run time"
    table = Table(*columns, box=box.SIMPLE_HEAD, title=title)
    for s in summaries:
        reached = s["time_to_target"] is not None
        table.add_row(
            s["name"],
            f"{s['time_to_target']:.1f} s (ep {s['target_epoch']})" if reached else f"not in {len(s['epochs'])} ep",
            f"{100 * s['final_digit_accuracy']:.2f}",
            f"{100 * s['final_sum_accuracy']:.2f}",
            f"{s['train_seconds']:.1f}",
            f"{s['images_per_second']:,.0f}",
            "n/a" if s["peak_gpu_memory_bytes"] is None else f"{s['peak_gpu_memory_bytes'] / 2**20:.0f} MiB",
            *([speedup_text(s)] if with_classic else []),
            *([speedup_text(s, "speedup_vs_first")] if several else []),
        )
    console.print(table)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpu", type=int, metavar="N", help="CUDA device N (default: cuda:0 when there is one)")
    where.add_argument("--cpu", action="store_true", help="run on the CPU")
    add = parser.add_argument
    add(
        "--mnist-dir",
        type=Path,
        default=Path(os.environ.get(MNIST_DIR_ENV) or REPO_ROOT.parent / "shared" / "mnist"),
        help=f"torchvision MNIST root (default: ${MNIST_DIR_ENV}, else ../shared/mnist)",
    )
    add("--limit", type=int, help="rows per split, for quick runs")
    add(
        "--cpu-mode",
        action="store_true",
        help="on the CPU: presets cpu-v1 and cpu, target 99%%, the classic pipeline capped at 1 epoch",
    )
    add(
        "--baseline-epochs",
        type=int,
        help="epochs of the classic pipeline (the conv/BatchNorm classifier design); 0 skips it (default: 10; --cpu-mode: 1)",
    )
    add("--epochs", type=int, help="epochs of the mnistsum runs (default: the preset's)")
    add(
        "--preset",
        dest="presets",
        action="append",
        choices=list(PRESETS),
        help="mnistsum preset; repeat to time several (default: default; --cpu-mode: cpu-v1 and cpu)",
    )
    add("--arch-too", action="append", default=[], choices=list(ARCHITECTURES), help="also run mnistsum with this arch")
    add("--batch-size", type=int, default=128, help="classic pipeline's batch size (default: 128)")
    add("--num-workers", type=int, default=2, help="classic pipeline's DataLoader workers (default: 2)")
    add("--target", type=float, help="test digit accuracy to reach (default: 0.985; --cpu-mode: 0.99)")
    add("--sum-target", type=float, help="test sum accuracy to reach (default: --target)")
    add("--seed", type=int, default=0, help="seed of prepare and of every run (default: 0)")
    add("--json-out", type=Path, help="default: bench/results/bench-<device>.json")
    args = parser.parse_args(argv)
    if args.cpu_mode:
        if args.gpu is not None:
            parser.error("--cpu-mode runs on the CPU: drop --gpu")
        args.cpu = True
    for name, value in MODES["cpu" if args.cpu_mode else "default"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.sum_target is None:
        args.sum_target = args.target
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_all(
    args: argparse.Namespace, device: torch.device, tmp: Path, report: Callable[[dict[str, Any], list[RunResult]], None]
) -> None:
    """Prepare the rows once, then the classic pipeline (unless 0 epochs) and every preset
    (and extra arch), each scored on the test split after every epoch; `report` gets the
    results so far after each run, so a run cut short by a time limit keeps what finished."""
    mnist = load_mnist(resolve_source(args.mnist_dir))
    data_dir = DataDir(tmp / "data")
    prepare(mnist, PrepareOptions(seed=args.seed, limit=args.limit), data_dir)
    prepared = SplitData(data_dir, mnist=mnist)
    dataset, mnist = prepared.dataset, prepared.mnist
    rows = {name: len(split) for name, split in dataset.splits.items()}
    described = {"id": dataset.dataset_id, "rows": rows}
    console.print(f"dataset {dataset.dataset_id}: rows {rows}; target {Target(args.target, args.sum_target)}")
    test = split_tensors(dataset, mnist, "test", device)
    results: list[RunResult] = []
    if args.baseline_epochs:
        settings = {
            "arch": "convnet",
            "epochs": args.baseline_epochs,
            "batch_size": args.batch_size,
            "lr": 1e-3,
            "num_workers": args.num_workers,
        }
        results.append(RunResult(CLASSIC, settings, test))
        run_classic(args, dataset, mnist, device, results[-1])
        report(described, results)
    for name in args.presets:
        config = preset(name).with_overrides(epochs=args.epochs, seed=args.seed)
        for arch in dict.fromkeys([config.arch, *args.arch_too]):
            arch_config = config.with_overrides(arch=arch)
            results.append(RunResult(f"mnistsum {name}/{arch}", arch_config.to_dict(), test))
            run_mnistsum(arch_config, data_dir, mnist, device, results[-1], tmp)
            report(described, results)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device, _ = select_device(args.gpu, args.cpu)
    console.print(
        f"[bold]mnistsum bench[/] on {device} ({device_name(device)}); torch {torch.__version__}, torchvision {torchvision.__version__}"
    )
    target = Target(args.target, args.sum_target)
    out = args.json_out or REPO_ROOT / "bench" / "results" / f"bench-{str(device).replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summaries: list[dict[str, Any]] = []

    def write_json(dataset: dict[str, Any], results: list[RunResult]) -> None:
        summaries[:] = [result.summary(target) for result in results]
        add_speedups(summaries)
        report = {
            "device": str(device),
            "device_name": device_name(device),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "dataset": dataset,
            "target": {"digit": target.digit, "sum": target.sum},
            "runs": summaries,
        }
        partial = out.with_name(out.name + ".partial")  # replaced whole: a kill never leaves half a file
        partial.write_text(json.dumps(report, indent=2) + "\n")
        partial.replace(out)

    with tempfile.TemporaryDirectory(prefix="mnistsum-bench-") as tmp:
        run_all(args, device, Path(tmp), write_json)
    print_tables(summaries, target)
    console.print(f"written {out}")


if __name__ == "__main__":
    try:
        main()
    except MnistsumError as error:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {error}", soft_wrap=True)
        sys.exit(error.exit_code)
