"""What a command checks before it loads torch (seconds and hundreds of MB), so that a refusal
comes at once: its input files, and a --gpu this machine cannot have; then the device itself."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from mnistsum_cli import terminal
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.store.diskfiles import require
from mnistsum_cli.store.paths import SPLITS, DataDir
from mnistsum_cli.store.schemas import SPLIT_META
from mnistsum_cli.store.validation import Schema
from mnistsum_cli.torchrun import torchrun_rank

if TYPE_CHECKING:
    import torch

# The NVIDIA driver's library, which every CUDA program loads; torch has no CUDA build elsewhere
CUDA_DRIVER = {"linux": "libcuda.so.1", "win32": "nvcuda.dll"}


def require_inputs(*inputs: tuple[Path, Schema]) -> None:
    """Refuse a missing or unreadable input (path, its kind) in one line, as the later read would."""
    for path, kind in inputs:
        require(path, kind.max_bytes, kind.stage)


def splits(data: Path) -> list[tuple[Path, Schema]]:
    """The three splits of a data folder, as inputs of require_inputs."""
    return [(DataDir(data).split(name), SPLIT_META) for name in SPLITS]


def image_files(paths: list[Path]) -> None:
    """Refuse an image argument that is no file, in one line, as the later read would."""
    for path in paths:
        if not path.is_file():
            raise MnistsumError(f"{path}: {'not a file' if path.exists() else 'no such file'}")


def cuda_driver_missing() -> bool:
    """Whether this machine surely has no CUDA: no NVIDIA driver library loads (a millisecond,
    where asking torch takes seconds). Where it loads, torch decides whether a GPU is there."""
    name = CUDA_DRIVER.get(sys.platform)
    if name is None:
        return sys.platform == "darwin"  # other systems: unknown, left to torch
    import ctypes

    try:
        ctypes.CDLL(name)
    except OSError:
        return True
    return False


def refuse_impossible_device(gpu: Optional[int], cpu: bool, runtime: str = "torch") -> None:
    """Refuse a --gpu that cannot work before torch loads: with --runtime onnx, or on a machine
    without a CUDA driver. A command calls this first; with --cpu as well, or under torchrun,
    devices.select_device and distributed.join say what is wrong."""
    if gpu is None:
        return
    if runtime == "onnx":
        raise BadOption("--runtime onnx runs on the CPU: drop --gpu")
    if not cpu and torchrun_rank() is None and cuda_driver_missing():
        raise BadOption(f"--gpu {gpu}: CUDA is not available on this machine (no NVIDIA driver); use --cpu")


def device(gpu: Optional[int], cpu: bool) -> torch.device:
    """The device --gpu/--cpu choose (loading torch), with its notice when it was chosen for the user."""
    from mnistsum_cli.training.devices import select_device

    chosen, notice = select_device(gpu, cpu)
    notice_if(notice)
    return chosen


def runtime_device(runtime: str, gpu: Optional[int], cpu: bool) -> Optional[torch.device]:
    """torch's device for --runtime torch; None for onnx, which runs on the CPU and loads no torch
    (refuse_impossible_device refused --gpu with it)."""
    return None if runtime == "onnx" else device(gpu, cpu)


def notice_if(message: Optional[str]) -> None:
    if message is not None:
        terminal.notice(message)
