"""Data-parallel training under torchrun: the process group, each rank's device and share of the
work, and the collectives that keep the ranks in step.

A single process is a group of one with no process group, and every helper is then a no-op, so
the training loop reads the same either way.
"""

from __future__ import annotations

import gc
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from mnistsum_cli.data.tensors import SplitTensors
from mnistsum_cli.errors import BadOption, Interrupted, MnistsumError
from mnistsum_cli.store.interrupts import sigint_recorded
from mnistsum_cli.torchrun import TORCHRUN_VARIABLES, torchrun_rank
from mnistsum_cli.training.devices import select_device

Result = TypeVar("Result")

# DDP's switch for "no buffer broadcast at each forward". torch 2.14 renamed it
# `forward_sync_buffers` and deprecated `broadcast_buffers` (with a warning); before 2.14 only
# `broadcast_buffers` exists. The two differ in one thing: `broadcast_buffers=False` also skips
# the buffer broadcast when DDP is built. That broadcast is a no-op here: `train()` wraps the model
# right after building it under the same seed on every rank (BatchNorm buffers start as the same
# constants), and a resume loads the same checkpoint into every rank afterwards.
_LOCAL_BUFFERS = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


class RankFailed(MnistsumError):
    """The error one rank hit during setup, raised on every rank so that all of them stop."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank `rank` of `world_size`; backend None is one process."""

    rank: int = 0
    world_size: int = 1
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes artifacts and draws progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def describe(self) -> dict[str, object]:
        """What checkpoints, history and metadata record about the run's processes."""
        return {"world_size": self.world_size, "backend": self.backend}

    # ----------------------------------------------------------------------- sharding

    def bounds(self, rows: int) -> tuple[int, int]:
        """This rank's contiguous share [start, stop) of `rows` rows; shares differ by at most one row."""
        return self.rank * rows // self.world_size, (self.rank + 1) * rows // self.world_size

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        start, stop = self.bounds(len(rows))
        return rows[start:stop]

    def shard_split(self, split: SplitTensors) -> SplitTensors:
        start, stop = self.bounds(len(split))
        return SplitTensors(**{field.name: getattr(split, field.name)[start:stop] for field in fields(split)})

    def check_batch(self, batch_size: int) -> None:
        """Every rank takes an equal share of each global batch, so the mean gradient stays exact."""
        if batch_size % self.world_size or batch_size // self.world_size < 2:
            raise BadOption(
                f"a batch of {batch_size} rows does not split into equal shares of 2 rows or more over "
                f"{self.world_size} processes: pass a --batch-size that is a multiple of {self.world_size}, "
                f"at least {2 * self.world_size}"
            )

    # ----------------------------------------------------------------------- the model

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel: gradients averaged over the ranks in backward. BatchNorm keeps
        local statistics during training (buffers are not synced at each forward); see `average_buffers`."""
        if not self.active:
            return model
        device = next(model.parameters()).device
        device_ids = [device] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **_LOCAL_BUFFERS)

    def average_buffers(self, model: nn.Module) -> None:
        """Make BatchNorm's running statistics the mean over the ranks, identical everywhere,
        before the model is validated or saved."""
        if not self.active:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= self.world_size

    # ----------------------------------------------------------------------- collectives

    @property
    def _device(self) -> torch.device:
        """Where collectives' tensors live: the rank's GPU for NCCL, the CPU for gloo."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def broadcast_text(self, text: str, source: int = 0) -> str:
        """`text` as rank `source` holds it, on every rank."""
        if not self.active:
            return text
        encoded = (
            torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.zeros(0, dtype=torch.uint8)
        )
        size = torch.tensor([len(encoded)], device=self._device)
        dist.broadcast(size, source)
        buffer = (
            encoded.to(self._device)
            if self.rank == source
            else torch.empty(int(size), dtype=torch.uint8, device=self._device)
        )
        dist.broadcast(buffer, source)
        return bytes(buffer.cpu().tolist()).decode()

    def agree(self, action: Callable[[], Result]) -> Result:
        """Run a setup step on every rank. When it fails on any rank, every rank raises the error
        of the lowest failing rank, so all of them stop and rank 0 can report it in one line."""
        if not self.active:
            return action()
        failure: Optional[MnistsumError] = None
        try:
            result = action()
        except MnistsumError as error:
            failure = error
        first = torch.tensor([self.rank if failure else self.world_size], device=self._device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        source = int(first)
        if source == self.world_size:
            return result
        exit_code = torch.tensor([failure.exit_code if failure else 0], device=self._device)
        dist.broadcast(exit_code, source)
        message = self.broadcast_text(str(failure) if failure else "", source)
        raise RankFailed(message if source == 0 else f"rank {source}: {message}", int(exit_code))


SINGLE_PROCESS = Group()


# --------------------------------------------------------------------------- the process group


def join(gpu: Optional[int], cpu: bool) -> tuple[Group, torch.device, Optional[str]]:
    """Join the process group torchrun's environment describes: NCCL with rank k on
    cuda:LOCAL_RANK, or gloo on the CPU. Returns the group, the device and a notice for the user."""
    if gpu is not None:
        raise BadOption(
            "--gpu does not go with torchrun: each process uses cuda:LOCAL_RANK "
            "(choose the GPUs with CUDA_VISIBLE_DEVICES), or pass --cpu"
        )
    rank, local_rank, world_size = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    notice = None
    if cpu or not torch.cuda.is_available():
        device, backend = torch.device("cpu"), "gloo"
        if not cpu:
            notice = "no CUDA GPU found: training on the CPU with gloo"
    else:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise BadOption(
                f"LOCAL_RANK {local_rank} has no GPU (this machine has {count}): start at most {count} processes per node"
            )
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return Group(rank=rank, world_size=world_size, backend=backend), device, notice


@contextmanager
def process_group(gpu: Optional[int], cpu: bool, notify: Callable[[str], None]) -> Iterator[tuple[Group, torch.device]]:
    """The group and device this process trains with: under torchrun a joined process group
    (left when the block ends normally), otherwise one process on the device --gpu/--cpu choose.
    Rank 0 alone passes notices to `notify`."""
    if torchrun_rank() is None:
        device, notice = select_device(gpu, cpu)
        if notice:
            notify(notice)
        yield SINGLE_PROCESS, device
        return
    group, device, notice = join(gpu, cpu)
    if notice and group.is_main:
        notify(notice)
    with _interrupts_left_to_rank0(group):
        yield group, device
    # DDP wrappers sit in reference cycles: collect them while the group they use still exists,
    # or the collector may free one after the teardown (or at exit), which aborts the process.
    gc.collect()
    dist.destroy_process_group()  # not on errors: tearing down under a live DDP model can abort the process


@contextmanager
def _interrupts_left_to_rank0(group: Group) -> Iterator[None]:
    """Ctrl-C reaches every rank (torchrun forwards SIGINT). Rank 0 stops after saving the epoch;
    the others carry on until rank 0 leaves the group, then stop quietly with exit code 130
    instead of failing in a collective with a traceback."""
    if group.is_main:
        yield
        return
    with sigint_recorded() as received:
        try:
            yield
        except Exception:
            if received:
                raise Interrupted("interrupted") from None
            raise
