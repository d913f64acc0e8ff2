"""Stage 2's epoch loop: train the two-headed model on tensors already on the device, validate
and commit every epoch to the Run (which keeps the best epoch on val). session.run_training
calls it; the folder's safety (lock, set-aside, messages) is there."""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import nn

from mnistsum_cli import __version__
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.data.tensors import SplitTensors, augment, normalise, split_tensors
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.fingerprints import now_iso
from mnistsum_cli.store.paths import RunDir
from mnistsum_cli.training.checkpoint import Learner
from mnistsum_cli.training.devices import autocast_dtype, configure_reproducibility, precision_name
from mnistsum_cli.training.distributed import SINGLE_PROCESS, Group
from mnistsum_cli.training.inference import predict
from mnistsum_cli.training.metrics import StepRecorder
from mnistsum_cli.training.models import build_model
from mnistsum_cli.training.run import Run


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


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """One-cycle: linear rise to config.lr over the warm-up share, then linear fall to zero."""
    peak_step = max(1, round(config.warmup * total_steps))
    if step < peak_step:
        return config.lr * (step + 1) / peak_step
    return config.lr * max(0.0, (total_steps - step) / max(1, total_steps - peak_step))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on conv/linear weights only; the fused kernel on every device (one
    launch per step on CUDA, and faster than the foreach kernel on the CPU: docs/performance.md)."""
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
    if rows < 2:
        raise BadOption(
            f"the training split has {rows} row{'s' if rows != 1 else ''}; training needs 2 or more (BatchNorm): "
            "rerun `mnistsum prepare` with a smaller --val-size or a larger --limit (or none)"
        )
    batch_size = min(config.batch_size, rows)
    if batch_size < 2:
        raise BadOption("training needs batches of 2 rows or more (BatchNorm): raise --batch-size")
    return batch_size, rows // batch_size


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's randomness depends on (seed, epoch) only, so resume is exact."""
    return seed * 100_003 + epoch


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The epoch's shuffling and augmentation."""
    return torch.Generator(device=device).manual_seed(epoch_seed(seed, epoch))


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


def measure(model: nn.Module, split: SplitTensors, prefix: str, group: Group = SINGLE_PROCESS) -> dict[str, float]:
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


def check_finite(record: dict[str, Any], folder: RunDir) -> None:
    """Stop the run when an epoch's train or val loss is NaN or infinite (the weights diverged):
    nothing of that epoch is written, so the last saved epoch stays the run's state. Checked on
    the epoch's totals, read once per epoch (metrics.StepRecorder.read), not per step. Under
    torchrun every rank holds the same all-reduced totals, so all ranks stop together."""
    for key in ("train_loss", "val_loss"):
        value = record[key]
        if not math.isfinite(value):
            epoch = record["epoch"]
            before = "epoch 1" if epoch == 2 else f"epochs 1-{epoch - 1}"
            kept = f"{folder.root} keeps {before} as saved" if epoch > 1 else "nothing of this run was saved"
            raise MnistsumError(
                f"epoch {epoch}: the {key.replace('_', ' ')} is {value} (training diverged): stopped before saving "
                f"it; {kept}; train again with a lower --lr"
            )


# --------------------------------------------------------------------------- the stage


def train(
    config: TrainConfig,
    data: TrainData,
    folder: RunDir,
    device: torch.device,
    resume: bool = False,
    reporter: Reporter = SilentReporter(),
    group: Group = SINGLE_PROCESS,
    aside: Optional[Path] = None,
) -> Run:
    """Train for config.epochs (continuing the run saved in `folder` when resume); returns the
    run. Under torchrun every rank calls this; rank 0 alone writes the run folder. `aside`: where
    the first epoch's commit moves the run found in `folder` (run.aside_folder)."""
    torch.manual_seed(config.seed)
    configure_reproducibility(device, config.deterministic)
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    model = build_model(config.arch).to(device, memory_format=memory_format)
    batch_size, steps = batching(len(data.train), config)
    group.check_batch(batch_size)
    step_model = group.wrap(model)
    step_model = torch.compile(step_model) if config.compile else step_model
    optimizer = make_optimizer(model, config)
    dtype = autocast_dtype(device, config.amp)
    learner = Learner(model, optimizer, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))
    facts = {
        "device": str(device),
        "precision": precision_name(dtype),
        "torch_version": torch.__version__,
        "package_version": __version__,
        "started_at": now_iso(),
        **group.describe(),
    }
    if resume:
        run = group.agree(lambda: Run.resume(folder, learner, config, data.dataset_id, facts))
    else:
        run_id = group.broadcast_text(secrets.token_hex(8))
        run = Run.begin(folder, config, data.dataset_id, run_id, facts, aside=aside)

    for epoch in range(run.epoch, config.epochs):
        reporter.epoch_start(epoch + 1, config.epochs, steps, batch_size)
        torch.manual_seed(epoch_seed(config.seed, epoch))  # anything drawing on the global RNG
        started = time.perf_counter()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr_end": lr_at((epoch + 1) * steps - 1, steps * config.epochs, config),
        }
        totals, step_records = train_epoch(
            model, step_model, optimizer, learner.scaler, data.train, config, epoch, reporter, group
        )
        record.update(totals)
        group.average_buffers(model)
        record.update(measure(model, data.val, "val", group))
        check_finite(record, folder)  # before anything of the epoch is saved
        record["seconds"] = time.perf_counter() - started
        record["world_size"] = group.world_size
        record["steps"] = step_records
        improved = run.add_epoch(record)
        if group.is_main:
            run.write_epoch(learner, improved)
        reporter.epoch_end(record)
    return run


def load_train_data(prepared: SplitData, device: torch.device) -> TrainData:
    """The train and val splits on `device`, checked against the MNIST they index."""
    dataset, mnist = prepared.dataset, prepared.mnist
    return TrainData(
        train=split_tensors(dataset, mnist, "train", device),
        val=split_tensors(dataset, mnist, "val", device),
        dataset_id=dataset.dataset_id,
    )
