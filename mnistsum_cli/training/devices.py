"""Device policy: which device (--gpu N, --cpu, or the first GPU), which training precision,
and how reproducible a CUDA run is."""

from __future__ import annotations

import os
from typing import Optional

import torch

from mnistsum_cli.errors import BadOption

BF16_CAPABILITY = (8, 0)  # Ampere and newer run bf16 natively; older GPUs would emulate it


def select_device(gpu: Optional[int], cpu: bool) -> tuple[torch.device, Optional[str]]:
    """Return the device and, when it was chosen for the user, a one-line notice. A CUDA
    device becomes the current device, so nothing strays onto GPU 0."""
    if gpu is not None and cpu:
        raise BadOption("--gpu and --cpu exclude each other: pass one")
    if gpu is not None and gpu < 0:
        raise BadOption(f"--gpu {gpu}: GPU numbers start at 0")
    if cpu:
        return torch.device("cpu"), None
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu is not None:
        if available == 0:
            raise BadOption(f"--gpu {gpu}: CUDA is not available on this machine; use --cpu")
        if gpu >= available:
            raise BadOption(f"--gpu {gpu}: no such GPU (this machine has {available}: 0-{available - 1})")
    elif not available:
        return torch.device("cpu"), "no CUDA GPU found: running on the CPU"
    device = torch.device("cuda", gpu or 0)
    torch.cuda.set_device(device)
    return device, None


def autocast_dtype(device: torch.device, amp: bool) -> Optional[torch.dtype]:
    """The training autocast dtype: bf16 on GPUs with native bf16, fp16 (with a grad scaler)
    on older GPUs, None (fp32) on the CPU or with --no-amp. Evaluation is always fp32."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= BF16_CAPABILITY else torch.float16


def precision_name(dtype: Optional[torch.dtype]) -> str:
    """How a run's config names its precision: bf16, fp16 or fp32."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def configure_reproducibility(device: torch.device, deterministic: bool) -> None:
    """On CUDA: cuDNN autotuning (fast, not bit-exact) unless `deterministic`, which turns it
    off and asks for deterministic algorithms. The CPU path is deterministic either way."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for exact results
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
