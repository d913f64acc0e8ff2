"""Stage 2: train the two-headed model; checkpoint every epoch; keep the best epoch on val."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import nn

from mnistsum_cli import __version__
from mnistsum_cli.artifacts import (
    CHECKPOINT_FORMAT,
    DataDir,
    RunDir,
    interrupts_deferred,
    now_iso,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from mnistsum_cli.config import TrainConfig
from mnistsum_cli.data import SplitTensors, augment, load_dataset, normalise, split_tensors
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.mnist import Mnist
from mnistsum_cli.modelio import autocast, predict, save_model
from mnistsum_cli.models import build_model


class Reporter(Protocol):
    """What train() tells its caller; the CLI draws a progress bar from it."""

    def epoch_start(self, epoch: int, epochs: int, steps: int, batch_size: int) -> None: ...
    def step(self) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...


class SilentReporter:
    def epoch_start(self, epoch: int, epochs: int, steps: int, batch_size: int) -> None:
        pass

    def step(self) -> None:
        pass

    def epoch_end(self, record: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class TrainData:
    train: SplitTensors
    val: SplitTensors
    dataset_id: str


@dataclass
class RunState:
    """What a run has done so far; saved every epoch so `--resume` can continue it."""

    run_id: str
    epoch: int  # epochs completed
    best_epoch: int
    history: list[dict[str, Any]]


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """One-cycle: linear rise to config.lr over the warm-up share, then linear fall to zero."""
    peak_step = max(1, round(config.warmup * total_steps))
    if step < peak_step:
        return config.lr * (step + 1) / peak_step
    return config.lr * max(0.0, (total_steps - step) / max(1, total_steps - peak_step))


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on conv/linear weights only; the fused kernel on CUDA."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda")


def batching(rows: int, config: TrainConfig) -> tuple[int, int]:
    """(batch size, steps per epoch): fixed-size batches; the remainder of a permutation waits
    for another epoch. A split smaller than one batch is one batch."""
    batch_size = min(config.batch_size, rows)
    if batch_size < 2:
        raise BadOption("training needs batches of 2 rows or more (BatchNorm): raise --batch-size or --limit")
    return batch_size, rows // batch_size


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Each epoch's shuffling and augmentation depend on (seed, epoch) only, so resume is exact."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


def train_epoch(
    model: nn.Module,
    step_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SplitTensors,
    config: TrainConfig,
    epoch: int,
    reporter: Reporter,
) -> dict[str, float]:
    """One pass over fixed-size batches of a fresh permutation; returns train loss/accuracy."""
    device = data.images.device
    batch_size, steps = batching(len(data), config)
    total_steps = steps * config.epochs
    generator = epoch_generator(config.seed, epoch, device)
    order = torch.randperm(len(data), device=device, generator=generator)
    totals = torch.zeros(4, device=device)  # digit loss, sum loss, digit correct, sum correct
    model.train()
    for step in range(steps):
        rows = order[step * batch_size : (step + 1) * batch_size]
        images = normalise(augment(data.images[rows], config, generator))
        digits, sums = data.digits[rows], data.sums[rows]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch * steps + step, total_steps, config)
        with autocast(device, config.amp):
            digit_logits, sum_logits = step_model(images, data.numbers[rows])
        digit_loss = nn.functional.cross_entropy(digit_logits.float(), digits, label_smoothing=config.label_smoothing)
        sum_loss = nn.functional.cross_entropy(sum_logits.float(), sums, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        (digit_loss + sum_loss).backward()
        optimizer.step()
        with torch.no_grad():
            totals += torch.stack(
                [
                    digit_loss.detach() * batch_size,
                    sum_loss.detach() * batch_size,
                    (digit_logits.argmax(1) == digits).sum(),
                    (sum_logits.argmax(1) == sums).sum(),
                ]
            )
        reporter.step()
    digit_loss, sum_loss, digit_accuracy, sum_accuracy = (totals / (steps * batch_size)).tolist()
    return {
        "train_digit_loss": digit_loss,
        "train_sum_loss": sum_loss,
        "train_loss": digit_loss + sum_loss,
        "train_digit_accuracy": digit_accuracy,
        "train_sum_accuracy": sum_accuracy,
    }


def measure(model: nn.Module, split: SplitTensors, config: TrainConfig, prefix: str) -> dict[str, float]:
    predictions = predict(model, split, amp=config.amp)
    digit_loss, sum_loss, digit_accuracy, sum_accuracy = torch.stack(
        [
            predictions.digit_loss.mean(),
            predictions.sum_loss.mean(),
            (predictions.digit == split.digits).float().mean(),
            (predictions.sum == split.sums).float().mean(),
        ]
    ).tolist()
    return {
        f"{prefix}_digit_loss": digit_loss,
        f"{prefix}_sum_loss": sum_loss,
        f"{prefix}_loss": digit_loss + sum_loss,
        f"{prefix}_digit_accuracy": digit_accuracy,
        f"{prefix}_sum_accuracy": sum_accuracy,
    }


def selection_score(record: dict[str, Any]) -> tuple[float, float]:
    """Which epoch is kept: highest val sum accuracy, then val digit accuracy (later wins ties)."""
    return (record["val_sum_accuracy"], record["val_digit_accuracy"])


# --------------------------------------------------------------------------- checkpoints


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten optimizer state into named tensors plus JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {
        f"optim.{param_id}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
        for param_id, param_state in state["state"].items()
        for key, value in param_state.items()
        if value is not None
    }
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_epoch(
    run: RunDir,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    data: TrainData,
    state: RunState,
    improved: bool,
    run_info: dict[str, Any],
) -> None:
    """Write model (when val improved), checkpoint, history, counters and run config: all or none."""
    common = {"run_id": state.run_id, "dataset_id": data.dataset_id, "config": config.to_dict()}
    with interrupts_deferred():
        if improved:
            best = state.history[state.best_epoch - 1]
            save_model(
                run.model,
                model,
                {
                    **common,
                    "arch": config.arch,
                    "epoch": state.best_epoch,
                    "val_digit_accuracy": best["val_digit_accuracy"],
                    "val_sum_accuracy": best["val_sum_accuracy"],
                },
            )
        optim_tensors, groups = optimizer_tensors(optimizer)
        weights = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
        write_safetensors(
            run.checkpoint,
            {**weights, **optim_tensors},
            {"format": CHECKPOINT_FORMAT, **common, "epoch": state.epoch, "param_groups": groups},
        )
        write_json(run.history, {**common, "best_epoch": state.best_epoch, "epochs": state.history})
        write_json(run.train_state, {**common, "epoch": state.epoch, "best_epoch": state.best_epoch, "updated_at": now_iso()})
        write_json(run.config, run_info)


def load_checkpoint(
    run: RunDir, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig, data: TrainData
) -> RunState:
    """Restore a run saved by save_epoch, refusing one made with other data or settings."""
    counters = read_json(run.train_state, stage="train")
    tensors, meta = read_safetensors(run.checkpoint, stage="train", expected_format=CHECKPOINT_FORMAT)
    history = read_json(run.history, stage="train")
    if not (counters.get("run_id") == meta.get("run_id") == history.get("run_id")):
        raise MnistsumError(f"{run.root} holds files of different training runs: start afresh without --resume")
    if counters.get("epoch") != meta.get("epoch"):
        raise MnistsumError(f"{run.checkpoint} and {run.train_state} disagree on the epoch: start afresh without --resume")
    if meta.get("dataset_id") != data.dataset_id:
        raise MnistsumError("the checkpoint was trained on another dataset: start afresh without --resume")
    saved = TrainConfig.from_dict(meta["config"])
    if saved != config:
        raise MnistsumError(f"--resume with other settings ({', '.join(saved.changes_to(config))}) than the checkpoint's")
    weights = {name[len("model.") :]: t for name, t in tensors.items() if name.startswith("model.")}
    model.load_state_dict(weights)
    load_optimizer(optimizer, {n: t for n, t in tensors.items() if n.startswith("optim.")}, meta["param_groups"])
    epoch = int(meta["epoch"])
    return RunState(
        run_id=meta["run_id"],
        epoch=epoch,
        best_epoch=int(counters["best_epoch"]),
        history=history["epochs"][:epoch],
    )


def saved_config(run: RunDir) -> Optional[TrainConfig]:
    """The settings of the run saved in `run`, for `--resume` to start from."""
    if not run.checkpoint.exists():
        return None
    _, meta = read_safetensors(run.checkpoint, stage="train", expected_format=CHECKPOINT_FORMAT, metadata_only=True)
    return TrainConfig.from_dict(meta["config"])


# --------------------------------------------------------------------------- the stage


def train(
    config: TrainConfig,
    data: TrainData,
    run: RunDir,
    device: torch.device,
    resume: bool = False,
    reporter: Reporter = SilentReporter(),
) -> RunState:
    """Train for config.epochs (continuing a saved run when resume); returns the run's state."""
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(config.arch).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if config.compile else model
    optimizer = make_optimizer(model, config, device)

    if resume:
        state = load_checkpoint(run, model, optimizer, config, data)
    else:
        state = RunState(run_id=secrets.token_hex(8), epoch=0, best_epoch=0, history=[])
    run_info = {
        "run_id": state.run_id,
        "dataset_id": data.dataset_id,
        "config": config.to_dict(),
        "device": str(device),
        "torch_version": torch.__version__,
        "package_version": __version__,
        "started_at": now_iso(),
    }

    batch_size, steps = batching(len(data.train), config)
    for epoch in range(state.epoch, config.epochs):
        reporter.epoch_start(epoch + 1, config.epochs, steps, batch_size)
        torch.manual_seed(config.seed * 100_003 + epoch)  # anything drawing on the global RNG
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr_end": lr_at((epoch + 1) * steps - 1, steps * config.epochs, config)}
        record.update(train_epoch(model, step_model, optimizer, data.train, config, epoch, reporter))
        record.update(measure(model, data.val, config, "val"))
        record["seconds"] = time.perf_counter() - started
        state.history.append(record)
        state.epoch = epoch + 1
        best = state.history[state.best_epoch - 1] if state.best_epoch else None
        improved = best is None or selection_score(record) >= selection_score(best)
        if improved:
            state.best_epoch = state.epoch
        save_epoch(run, model, optimizer, config, data, state, improved, run_info)
        reporter.epoch_end(record)
    return state


@dataclass(frozen=True)
class TrainOutcome:
    state: RunState
    load_seconds: float  # reading the splits and MNIST, moving them to the device
    train_seconds: float  # the training loop: epochs, validation, checkpoints


def train_model(
    config: TrainConfig,
    data_dir: DataDir,
    run: RunDir,
    device: torch.device,
    mnist_dir: Optional[Path] = None,
    resume: bool = False,
    reporter: Reporter = SilentReporter(),
    mnist: Optional[Mnist] = None,
) -> TrainOutcome:
    """The `train` stage: read the prepared splits, train, save; Ctrl-C keeps the last saved epoch
    (and propagates: the caller says what is on disk)."""
    started = time.perf_counter()
    dataset, mnist = load_dataset(data_dir, mnist_dir, mnist)
    data = TrainData(
        train=split_tensors(dataset, mnist, "train", device),
        val=split_tensors(dataset, mnist, "val", device),
        dataset_id=dataset.dataset_id,
    )
    loaded = time.perf_counter()
    state = train(config, data, run, device, resume=resume, reporter=reporter)
    return TrainOutcome(state=state, load_seconds=loaded - started, train_seconds=time.perf_counter() - loaded)
