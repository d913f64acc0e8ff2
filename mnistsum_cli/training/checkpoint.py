"""Saving and restoring training: model.safetensors (the kept epoch's weights, enough to rebuild
the model) and checkpoint.safetensors with history.json and train_state.json (what `--resume`
continues from). The model, its optimizer and its grad scaler travel together as a Learner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mnistsum_cli import __version__
from mnistsum_cli.errors import MnistsumError, first_line
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.fingerprints import now_iso
from mnistsum_cli.store.interrupts import interrupts_deferred
from mnistsum_cli.store.paths import CHECKPOINT_FORMAT, MODEL_FORMAT, RunDir
from mnistsum_cli.store.schemas import CHECKPOINT_META, HISTORY, MODEL_META, TRAIN_STATE
from mnistsum_cli.store.tensorfiles import decode_safetensors, read_safetensors, safetensors_bytes
from mnistsum_cli.store.transactions import commit
from mnistsum_cli.training.models import build_model
from mnistsum_cli.training.setaside import set_aside

WEIGHTS_PREFIX = "model."  # checkpoint tensors: model.<name> are weights, optim.<id>.<key> optimizer state
OPTIMIZER_PREFIX = "optim."
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")
# What every file of a run records, so that a reader can tell they belong together.
COMMON_KEYS = ("run_id", "dataset_id", "config", "world_size", "backend")


@dataclass
class Learner:
    """What a checkpoint saves and restores as one: the model, its optimizer and its grad scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


@dataclass
class RunState:
    """What a run has done so far; saved every epoch so `--resume` can continue it."""

    run_id: str
    epoch: int  # epochs completed
    best_epoch: int
    history: list[dict[str, Any]]


# --------------------------------------------------------------------------- model.safetensors


def model_bytes(model: nn.Module, metadata: dict[str, Any]) -> bytes:
    """model.safetensors: weights plus everything needed to rebuild the model (arch) and to
    trace it (metadata)."""
    return safetensors_bytes(model.state_dict(), {"format": MODEL_FORMAT, "package_version": __version__, **metadata})


def save_model(path: Path, model: nn.Module, metadata: dict[str, Any]) -> None:
    """Write model.safetensors alone (a commit of its folder)."""
    data = model_bytes(model, metadata)
    with commit(path.parent) as change:
        change.write(path, data)


def load_model(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from model.safetensors: weights + metadata, no pickle."""
    tensors, meta = read_safetensors(path, stage="train", expected_format=MODEL_FORMAT)
    return _rebuilt(tensors, meta, path, device), meta


def load_model_bytes(data: bytes, path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """load_model on the bytes of `path`, read once by the caller."""
    tensors, meta = decode_safetensors(data, path, stage="train", expected_format=MODEL_FORMAT)
    return _rebuilt(tensors, meta, path, device), meta


def _rebuilt(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path, device: torch.device) -> nn.Module:
    model = build_model(MODEL_META.check(meta, path)["arch"])
    load_weights(model, tensors, path, meta["arch"])
    return model.to(device).eval()


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Copy saved weights into `model`; missing, extra or misshapen tensors (weights of another
    architecture, or damage) are one line naming the first mismatch."""
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:  # "Error(s) in loading state_dict for X:" then one line per mismatch
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        reason = lines[1] if len(lines) > 1 else first_line(error)
        raise MnistsumError(f"{path} does not fit architecture {arch!r} ({reason}): rerun `mnistsum train`") from None


# --------------------------------------------------------------------------- checkpoint.safetensors


def model_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict inside a checkpoint's tensors (the one place that knows the prefix)."""
    return {name[len(WEIGHTS_PREFIX) :]: t for name, t in tensors.items() if name.startswith(WEIGHTS_PREFIX)}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten optimizer state into named tensors plus JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {
        f"{OPTIMIZER_PREFIX}{param_id}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
        for param_id, param_state in state["state"].items()
        for key, value in param_state.items()
        if value is not None
    }
    return tensors, state["param_groups"]


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict], path: Path
) -> None:
    """Restore saved optimizer state into a live optimizer of the same model.

    Hyperparameters come from the checkpoint, but the live optimizer's implementation flags
    stand (a checkpoint moves between devices), and every state tensor takes the layout of
    its parameter: the fused kernels pair elements by memory order, so NCHW moments of
    channels_last weights would be mis-paired on the CPU and refused on CUDA. State that does
    not fit the parameters is refused here, in one line: torch would take it and fail in the
    middle of the first step.
    """
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(OPTIMIZER_PREFIX):
            parts = name.split(".", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                raise _not_this_model(path, f"tensor {name} names no parameter")
            state.setdefault(int(parts[1]), {})[parts[2]] = value
    _check_optimizer_state(optimizer, state, groups, path)
    live_flags = [{key: group[key] for key in IMPLEMENTATION_FLAGS if key in group} for group in optimizer.param_groups]
    groups = [{**saved, **flags} for saved, flags in zip(groups, live_flags)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _not_this_model(path: Path, reason: str) -> MnistsumError:
    return MnistsumError(
        f"{path} is not a checkpoint of this model ({reason}): rerun `mnistsum train` without --resume"
    )


def _check_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[int, dict[str, torch.Tensor]], groups: list[dict], path: Path
) -> None:
    """The saved groups hold as many parameters as the live ones, and each saved state tensor is
    a scalar (AdamW's step) or has the shape of the parameter it belongs to (its moments)."""
    live = [group["params"] for group in optimizer.param_groups]
    sizes, live_sizes = [len(group["params"]) for group in groups], [len(params) for params in live]
    if sizes != live_sizes:
        raise _not_this_model(path, f"optimizer groups of {sizes} parameters, the model's {live_sizes}")
    param_of = {
        param_id: param for group, params in zip(groups, live) for param_id, param in zip(group["params"], params)
    }
    for param_id, param_state in sorted(state.items()):
        if param_id not in param_of:
            raise _not_this_model(path, f"optimizer state of parameter {param_id}, which no group holds")
        shape = tuple(param_of[param_id].shape)
        for key, value in param_state.items():
            if value.dim() != 0 and tuple(value.shape) != shape:
                raise _not_this_model(
                    path,
                    f"{OPTIMIZER_PREFIX}{param_id}.{key} has shape {list(value.shape)}, its parameter {list(shape)}",
                )


def save_epoch(
    run: RunDir,
    learner: Learner,
    state: RunState,
    improved: bool,
    run_info: dict[str, Any],
    kept: Optional[Path] = None,
) -> None:
    """Commit an epoch: model (when val improved), checkpoint, history, counters and run config
    (`run_info`, what config.json holds) change in one step, all or none. `kept`: the first
    epoch of a new run also moves the previous run there, in the same step."""
    common = {key: run_info[key] for key in COMMON_KEYS}
    with interrupts_deferred(), commit(run.root, "train", "--artifacts") as change:
        if kept is not None:
            set_aside(change, run, kept)
        if improved:
            best = state.history[state.best_epoch - 1]
            change.write(
                run.model,
                model_bytes(
                    learner.model,
                    {
                        **common,
                        "arch": common["config"]["arch"],
                        "epoch": state.best_epoch,
                        "val_digit_accuracy": best["val_digit_accuracy"],
                        "val_sum_accuracy": best["val_sum_accuracy"],
                    },
                ),
            )
        optim_tensors, groups = optimizer_tensors(learner.optimizer)
        weights = {f"{WEIGHTS_PREFIX}{name}": tensor for name, tensor in learner.model.state_dict().items()}
        change.write(
            run.checkpoint,
            safetensors_bytes(
                {**weights, **optim_tensors},
                {
                    "format": CHECKPOINT_FORMAT,
                    **common,
                    "epoch": state.epoch,
                    "param_groups": groups,
                    "grad_scaler": learner.scaler.state_dict(),
                },
            ),
        )
        change.write_json(run.history, {**common, "best_epoch": state.best_epoch, "epochs": state.history})
        change.write_json(
            run.train_state, {**common, "epoch": state.epoch, "best_epoch": state.best_epoch, "updated_at": now_iso()}
        )
        change.write_json(run.config, run_info)


def load_checkpoint(run: RunDir, learner: Learner, config: TrainConfig, dataset_id: str) -> RunState:
    """Restore a run saved by save_epoch into `learner`, refusing one made with other data or settings."""
    counters = TRAIN_STATE.read_json(run.train_state)
    tensors, meta = read_safetensors(run.checkpoint, stage="train", expected_format=CHECKPOINT_FORMAT)
    CHECKPOINT_META.check(meta, run.checkpoint)
    history = HISTORY.read_json(run.history)
    if not (counters.get("run_id") == meta.get("run_id") == history.get("run_id")):
        raise MnistsumError(f"{run.root} holds files of different training runs: start afresh without --resume")
    if counters.get("epoch") != meta.get("epoch"):
        raise MnistsumError(
            f"{run.checkpoint} and {run.train_state} disagree on the epoch: start afresh without --resume"
        )
    if meta.get("dataset_id") != dataset_id:
        raise MnistsumError("the checkpoint was trained on another dataset: start afresh without --resume")
    saved = TrainConfig.from_dict(meta["config"])
    if saved != config:
        raise MnistsumError(
            f"--resume with other settings ({', '.join(saved.changes_to(config))}) than the checkpoint's"
        )
    load_weights(learner.model, model_weights(tensors), run.checkpoint, config.arch)
    load_optimizer(learner.optimizer, tensors, meta["param_groups"], run.checkpoint)
    if learner.scaler.is_enabled() and meta.get("grad_scaler"):
        learner.scaler.load_state_dict(meta["grad_scaler"])
    epoch = int(meta["epoch"])
    return RunState(
        run_id=meta["run_id"],
        epoch=epoch,
        best_epoch=int(counters["best_epoch"]),
        history=history["epochs"][:epoch],
    )


def checkpoint_model(run: RunDir, device: torch.device) -> nn.Module:
    """The model as the last saved epoch left it (model.safetensors holds the best epoch instead),
    for scoring a run while it trains."""
    tensors, meta = read_safetensors(run.checkpoint, stage="train", expected_format=CHECKPOINT_FORMAT)
    config = TrainConfig.from_dict(CHECKPOINT_META.check(meta, run.checkpoint)["config"])
    model = build_model(config.arch)
    load_weights(model, model_weights(tensors), run.checkpoint, config.arch)
    return model.to(device)


def saved_config(run: RunDir) -> Optional[TrainConfig]:
    """The settings of the run saved in `run`, for `--resume` to start from."""
    if not run.checkpoint.exists():
        return None
    _, meta = read_safetensors(run.checkpoint, stage="train", expected_format=CHECKPOINT_FORMAT, metadata_only=True)
    return TrainConfig.from_dict(CHECKPOINT_META.check(meta, run.checkpoint)["config"])
