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
from mnistsum_cli.devices import autocast_dtype, configure_reproducibility, precision_name
from mnistsum_cli.distributed import SINGLE_PROCESS, Group
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.metrics import StepRecorder
from mnistsum_cli.mnist import Mnist
from mnistsum_cli.modelio import predict, save_model
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
    """AdamW; weight decay on conv/linear weights only; the fused kernel on every device (one
    launch per step on CUDA, 5 % faster training than the foreach kernel on the CPU)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, fused=True)


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
    scaler: torch.amp.GradScaler,
    data: SplitTensors,
    config: TrainConfig,
    epoch: int,
    reporter: Reporter,
    group: Group = SINGLE_PROCESS,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """One pass over fixed-size batches of a fresh permutation; returns train loss/accuracy and
    the per-step records (metrics.py). Every rank draws the same permutation and augmentation
    and trains on its share of each batch."""
    device = data.images.device
    dtype = autocast_dtype(device, config.amp)
    batch_size, steps = batching(len(data), config)
    total_steps = steps * config.epochs
    generator = epoch_generator(config.seed, epoch, device)
    order = torch.randperm(len(data), device=device, generator=generator)
    recorder = StepRecorder(steps, device)
    model.train()
    for step in range(steps):
        rows = order[step * batch_size : (step + 1) * batch_size]
        images = normalise(group.shard(augment(data.images[rows], config, generator)))
        rows = group.shard(rows)
        digits, sums = data.digits[rows], data.sums[rows]
        lr = lr_at(epoch * steps + step, total_steps, config)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            digit_logits, sum_logits = step_model(images, data.numbers[rows])
        digit_loss = nn.functional.cross_entropy(digit_logits.float(), digits, label_smoothing=config.label_smoothing)
        sum_loss = nn.functional.cross_entropy(sum_logits.float(), sums, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(digit_loss + sum_loss).backward()
        scaler.step(optimizer)  # fp16 only: the fused kernel unscales and skips inf steps on the GPU
        scaler.update()
        with torch.no_grad():
            recorder.add(
                step,
                torch.stack(
                    [
                        digit_loss.detach() * len(rows),
                        sum_loss.detach() * len(rows),
                        (digit_logits.argmax(1) == digits).sum(),
                        (sum_logits.argmax(1) == sums).sum(),
                    ]
                ),
                lr,
            )
        reporter.step()
    return recorder.read(group, batch_size, epoch)


def measure(
    model: nn.Module, split: SplitTensors, config: TrainConfig, prefix: str, group: Group = SINGLE_PROCESS
) -> dict[str, float]:
    """Losses and accuracies over a split; each rank predicts its share, the sums are all-reduced."""
    shard = group.shard_split(split)
    predictions = predict(model, shard)
    totals = torch.stack(
        [
            predictions.digit_loss.sum(),
            predictions.sum_loss.sum(),
            (predictions.digit == shard.digits).sum().float(),
            (predictions.sum == shard.sums).sum().float(),
        ]
    )
    digit_loss, sum_loss, digit_accuracy, sum_accuracy = (group.all_reduce_sum(totals) / len(split)).tolist()
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


IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Restore saved optimizer state into a live optimizer of the same model.

    Hyperparameters come from the checkpoint, but the live optimizer's implementation flags
    stand (a checkpoint moves between devices), and every state tensor takes the layout of
    its parameter: the fused kernels pair elements by memory order, so NCHW moments of
    channels_last weights would be mis-paired on the CPU and refused on CUDA.
    """
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    live_flags = [{key: group[key] for key in IMPLEMENTATION_FLAGS if key in group} for group in optimizer.param_groups]
    groups = [{**saved, **flags} for saved, flags in zip(groups, live_flags)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def save_epoch(
    run: RunDir,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    data: TrainData,
    state: RunState,
    improved: bool,
    run_info: dict[str, Any],
    group: Group = SINGLE_PROCESS,
) -> None:
    """Write model (when val improved), checkpoint, history, counters and run config: all or none."""
    common = {"run_id": state.run_id, "dataset_id": data.dataset_id, "config": config.to_dict(), **group.describe()}
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
            {"format": CHECKPOINT_FORMAT, **common, "epoch": state.epoch, "param_groups": groups,
             "grad_scaler": scaler.state_dict()},  # fmt: skip
        )
        write_json(run.history, {**common, "best_epoch": state.best_epoch, "epochs": state.history})
        write_json(run.train_state, {**common, "epoch": state.epoch, "best_epoch": state.best_epoch, "updated_at": now_iso()})
        write_json(run.config, run_info)


def load_checkpoint(
    run: RunDir,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    data: TrainData,
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
    if scaler.is_enabled() and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
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
    group: Group = SINGLE_PROCESS,
) -> RunState:
    """Train for config.epochs (continuing a saved run when resume); returns the run's state.
    Under torchrun every rank calls this; rank 0 alone writes the run folder."""
    torch.manual_seed(config.seed)
    configure_reproducibility(device, config.deterministic)
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    model = build_model(config.arch).to(device, memory_format=memory_format)
    batch_size, steps = batching(len(data.train), config)
    group.check_batch(batch_size)
    step_model = group.wrap(model)
    step_model = torch.compile(step_model) if config.compile else step_model
    optimizer = make_optimizer(model, config, device)
    dtype = autocast_dtype(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    if resume:
        state = group.agree(lambda: load_checkpoint(run, model, optimizer, scaler, config, data))
    else:
        state = RunState(run_id=group.broadcast_text(secrets.token_hex(8)), epoch=0, best_epoch=0, history=[])
    run_info = {
        "run_id": state.run_id,
        "dataset_id": data.dataset_id,
        "config": config.to_dict(),
        "device": str(device),
        "precision": precision_name(dtype),
        "torch_version": torch.__version__,
        "package_version": __version__,
        "started_at": now_iso(),
        **group.describe(),
    }

    for epoch in range(state.epoch, config.epochs):
        reporter.epoch_start(epoch + 1, config.epochs, steps, batch_size)
        torch.manual_seed(config.seed * 100_003 + epoch)  # anything drawing on the global RNG
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr_end": lr_at((epoch + 1) * steps - 1, steps * config.epochs, config)}
        totals, step_records = train_epoch(model, step_model, optimizer, scaler, data.train, config, epoch, reporter, group)
        record.update(totals)
        group.average_buffers(model)
        record.update(measure(model, data.val, config, "val", group))
        record["seconds"] = time.perf_counter() - started
        record["world_size"] = group.world_size
        record["steps"] = step_records
        state.history.append(record)
        state.epoch = epoch + 1
        best = state.history[state.best_epoch - 1] if state.best_epoch else None
        improved = best is None or selection_score(record) >= selection_score(best)
        if improved:
            state.best_epoch = state.epoch
        if group.is_main:
            save_epoch(run, model, optimizer, scaler, config, data, state, improved, run_info, group)
        reporter.epoch_end(record)
    return state


def load_train_data(data_dir: DataDir, mnist_dir: Optional[Path], mnist: Optional[Mnist], device: torch.device) -> TrainData:
    """The train and val splits on `device`, checked against the MNIST they index."""
    dataset, mnist = load_dataset(data_dir, mnist_dir, mnist)
    return TrainData(
        train=split_tensors(dataset, mnist, "train", device),
        val=split_tensors(dataset, mnist, "val", device),
        dataset_id=dataset.dataset_id,
    )


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
    group: Group = SINGLE_PROCESS,
) -> TrainOutcome:
    """The `train` stage: read the prepared splits, train, save; Ctrl-C keeps the last saved epoch
    (and propagates: the caller says what is on disk)."""
    started = time.perf_counter()
    data = group.agree(lambda: load_train_data(data_dir, mnist_dir, mnist, device))
    loaded = time.perf_counter()
    try:
        state = train(config, data, run, device, resume=resume, reporter=reporter, group=group)
    except torch.cuda.OutOfMemoryError:
        raise MnistsumError(
            f"{device} ran out of memory with batch size {config.batch_size}: try a smaller --batch-size"
        ) from None
    return TrainOutcome(state=state, load_seconds=loaded - started, train_seconds=time.perf_counter() - loaded)
