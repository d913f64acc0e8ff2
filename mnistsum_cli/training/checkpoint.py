"""The tensors of a run's files: model.safetensors (the kept epoch's weights, enough to rebuild
the model) and checkpoint.safetensors (weights, optimizer and grad scaler: what `--resume`
continues from), as bytes and back. The model, its optimizer and its grad scaler travel together
as a Learner. Which files a run writes, and when, is run.Run's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnistsum_cli import __version__
from mnistsum_cli.errors import MnistsumError, first_line
from mnistsum_cli.store.paths import CHECKPOINT_FORMAT, MODEL_FORMAT
from mnistsum_cli.store.schemas import CHECKPOINT_META, MODEL_META
from mnistsum_cli.store.tensorfiles import decode_safetensors, read_safetensors, safetensors_bytes
from mnistsum_cli.training.models import build_model

WEIGHTS_PREFIX = "model."  # checkpoint tensors: model.<name> are weights, optim.<id>.<key> optimizer state
OPTIMIZER_PREFIX = "optim."
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


@dataclass
class Learner:
    """What a checkpoint saves and restores as one: the model, its optimizer and its grad scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


# --------------------------------------------------------------------------- model.safetensors


def model_bytes(model: nn.Module, metadata: dict[str, Any]) -> bytes:
    """model.safetensors: weights plus everything needed to rebuild the model (arch) and to
    trace it (metadata)."""
    return safetensors_bytes(model.state_dict(), {"format": MODEL_FORMAT, "package_version": __version__, **metadata})


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


def checkpoint_bytes(learner: Learner, metadata: dict[str, Any]) -> bytes:
    """checkpoint.safetensors: the model's weights and the optimizer's state as tensors, the
    param groups and the grad scaler's state beside `metadata`."""
    optim_tensors, groups = optimizer_tensors(learner.optimizer)
    weights = {f"{WEIGHTS_PREFIX}{name}": tensor for name, tensor in learner.model.state_dict().items()}
    return safetensors_bytes(
        {**weights, **optim_tensors},
        {
            "format": CHECKPOINT_FORMAT,
            **metadata,
            "param_groups": groups,
            "grad_scaler": learner.scaler.state_dict(),
        },
    )


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """checkpoint.safetensors' tensors and checked metadata."""
    tensors, meta = read_safetensors(path, stage="train", expected_format=CHECKPOINT_FORMAT)
    return tensors, CHECKPOINT_META.check(meta, path)


def restore(learner: Learner, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path, arch: str) -> None:
    """Put a checkpoint's weights, optimizer state and grad scaler into `learner`."""
    load_weights(learner.model, model_weights(tensors), path, arch)
    load_optimizer(learner.optimizer, tensors, meta["param_groups"], path)
    if learner.scaler.is_enabled() and meta.get("grad_scaler"):
        learner.scaler.load_state_dict(meta["grad_scaler"])
