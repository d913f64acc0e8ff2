"""Choosing the device: --gpu N, --cpu, or the first GPU when there is one."""

from __future__ import annotations

from typing import Optional

import torch

from mnistsum_cli.errors import BadOption


def select_device(gpu: Optional[int], cpu: bool) -> tuple[torch.device, Optional[str]]:
    """Return the device and, when it was chosen for the user, a one-line notice."""
    if gpu is not None and cpu:
        raise BadOption("--gpu and --cpu exclude each other: pass one")
    if cpu:
        return torch.device("cpu"), None
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu is not None:
        if available == 0:
            raise BadOption(f"--gpu {gpu}: CUDA is not available on this machine; use --cpu")
        if gpu >= available:
            raise BadOption(f"--gpu {gpu}: no such GPU (this machine has {available}: 0-{available - 1})")
        return torch.device("cuda", gpu), None
    if available:
        return torch.device("cuda", 0), None
    return torch.device("cpu"), "no CUDA GPU found: running on the CPU"
