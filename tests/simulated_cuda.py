"""A simulated `cuda:0` for running the real stage code without a GPU.

`FakeTensorMode` gives tensors a CUDA device, shape, dtype and strides but no memory: every
aten op runs its shape/device logic, so an op mixing CPU and CUDA operands fails as on a GPU.
An `OpLog` dispatch mode underneath watches each op. What fakes cannot do gets a stand-in:

- `backward()` needs a real CUDA context: each parameter the loss depends on gets a gradient
  shaped and laid out like it (as AccumulateGrad would leave it).
- `torch.Generator(device="cuda")` needs a driver: a stand-in that remembers its device, and
  randperm/randint/rand check that it matches the device they draw on.
- safetensors needs bytes: writes are recorded (each tensor's device, shape and dtype), reads
  give back zeros of the recorded shapes; the package's own write/read functions still run.
- host reads (`.item()`, `.tolist()`, `nonzero`, `bincount`) have no values: they are recorded
  and answered with placeholders (1 for a scalar, `False` for a boolean, zeros, an empty `nonzero`).
- capability queries answer as an H100 (compute capability 9.0) unless told otherwise.

Everything else is the code users run: `train()`, `evaluate_model()`, `predict_row()`.
"""

from __future__ import annotations

import collections
import itertools
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)
TRANSFERS = {"_to_copy", "copy_"}  # device-to-device moves, legal across devices
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount"}  # output size or value needs the host
SHAPE_ONLY = {  # ops that launch no kernel: left out of the per-step count
    "view",
    "_unsafe_view",
    "reshape",
    "_reshape_alias",
    "unsqueeze",
    "squeeze",
    "t",
    "transpose",
    "expand",
    "slice",
    "select",
    "alias",
    "detach",
    "as_strided",
    "permute",
    "unflatten",
    "split",
    "lift_fresh",
    "empty",
    "empty_like",
    "empty_strided",
    "device",
    "_record_function_enter_new",
    "_record_function_exit",
}


def _package_frame() -> str:
    for frame in reversed(traceback.extract_stack()):
        if "mnistsum_cli" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


@dataclass(eq=False)
class OpLog(TorchDispatchMode):
    """Every aten op under it, tagged with the phase the test says it is in."""

    phase: str = "setup"
    ops: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)  # (phase, op, float output dtypes)
    problems: list[str] = field(default_factory=list)
    host_reads: list[tuple[str, str]] = field(default_factory=list)  # (phase, where)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors if t.dim() > 0}  # a 0-dim CPU tensor is a scalar argument
        if name not in TRANSFERS and {"cpu", "cuda"} <= devices:
            self.problems.append(f"{self.phase}: {func} mixes CPU and CUDA operands at {_package_frame()}")
        if name in ("_fused_adamw_", "_fused_adam_"):
            self._check_fused_operands(*args[:4])
        if name in HOST_READS and any(t.device.type == "cuda" for t in tensors):
            self.host_reads.append((self.phase, f"{name} at {_package_frame()}"))
        if name == "_local_scalar_dense":
            self.ops.append((self.phase, name, ()))
            return False if args[0].dtype == torch.bool else 1  # 1 keeps e.g. Adam's bias correction finite
        if name == "nonzero":
            self.ops.append((self.phase, name, ()))
            return torch.empty((0, args[0].dim()), dtype=torch.int64, device=args[0].device)
        if name == "bincount":
            self.ops.append((self.phase, name, ()))
            return torch.zeros(
                kwargs.get("minlength", args[2] if len(args) > 2 else 0), dtype=torch.int64, device=args[0].device
            )
        out = func(*args, **kwargs)
        dtypes = tuple(
            str(t.dtype) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()
        )
        self.ops.append((self.phase, name, dtypes))
        return out

    def _check_fused_operands(self, params, grads, exp_avgs, exp_avg_sqs) -> None:
        """What the CUDA kernel checks: params, grads and moments pairwise of one size and strides."""
        for param, *others in zip(params, grads, exp_avgs, exp_avg_sqs):
            for other in others:
                strides_differ = any(
                    size != 1 and a != b for size, a, b in zip(param.shape, param.stride(), other.stride())
                )
                if other.shape != param.shape or strides_differ:
                    self.problems.append(
                        f"{self.phase}: fused AdamW operands differ in layout: param {tuple(param.shape)} "
                        f"strides {param.stride()} vs {other.stride()} (CUDA raises here)"
                    )

    def count(self, phase: str, op: Optional[str] = None) -> int:
        return sum(1 for p, name, _ in self.ops if p == phase and (op is None or name == op) and name not in SHAPE_ONLY)

    def dtypes(self, phase: str, op: str) -> set[str]:
        return {dtype for p, name, dtypes in self.ops if p == phase and name == op for dtype in dtypes}


class PhaseReporter:
    """train()'s Reporter: marks the step loop ("step") apart from the epoch's end ("epoch end",
    where syncs are allowed), counts ops per step, and can press Ctrl-C after an epoch."""

    def __init__(self, log: OpLog, interrupt_after: Optional[int] = None) -> None:
        self.log, self.interrupt_after = log, interrupt_after
        self.steps_left = 0
        self.ops_per_step: list[int] = []
        self._mark = 0

    def epoch_start(self, epoch: int, epochs: int, steps: int, batch_size: int) -> None:
        self.log.phase, self.steps_left, self._mark = "step", steps, len(self.log.ops)

    def step(self) -> None:
        self.ops_per_step.append(sum(1 for _, name, _ in self.log.ops[self._mark :] if name not in SHAPE_ONLY))
        self._mark = len(self.log.ops)
        self.steps_left -= 1
        if self.steps_left == 0:
            self.log.phase = "epoch end"

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.log.phase = "between epochs"
        if record["epoch"] == self.interrupt_after:
            raise KeyboardInterrupt


class DeviceGenerator:
    """Stands in for torch.Generator(device=...), which needs a CUDA driver."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)


class SafetensorsStore:
    """Recorded safetensors files: the bytes on disk are a key into `files`."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[dict[str, tuple[tuple[int, ...], torch.dtype, str]], dict[str, str]]] = {}
        self._keys = itertools.count()

    def save(self, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> bytes:
        key = f"simulated-safetensors-{next(self._keys)}"
        self.files[key] = (
            {n: (tuple(t.shape), t.dtype, str(t.device)) for n, t in tensors.items()},
            dict(metadata or {}),
        )
        return key.encode()

    def parse(self, data: bytes, metadata_only: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """tensorfiles.parse_safetensors on a recorded file's key: CPU zeros of the recorded shapes
        (safetensors hands out CPU tensors) and the metadata."""
        tensors, raw = self.files[data.decode()]
        zeros = (
            {} if metadata_only else {n: torch.zeros(shape, dtype=dtype) for n, (shape, dtype, _) in tensors.items()}
        )
        return zeros, raw

    def edit_metadata(self, path: Path, key: str, edit) -> None:
        """Rewrite one metadata entry of the recorded file at `path` (JSON-decoded for `edit`)."""
        _, raw = self.files[path.read_text()]
        raw[key] = json.dumps(edit(json.loads(raw[key])))

    def written_devices(self) -> set[str]:
        return {device for tensors, _ in self.files.values() for _, _, device in tensors.values()}


@dataclass
class SimulatedCuda:
    """The stand-ins, installed by `simulate_cuda`; `log` watches the ops of `with sim.running():`."""

    log: OpLog
    store: SafetensorsStore
    fake_mode: FakeTensorMode
    loss_dtypes: list[torch.dtype]
    sum_logit_dtypes: list[torch.dtype]

    def running(self):
        return _Running(self)


class _Running:
    def __init__(self, sim: SimulatedCuda) -> None:
        self.sim = sim

    def __enter__(self) -> SimulatedCuda:
        self.sim.fake_mode.__enter__()
        self.sim.log.__enter__()
        return self.sim

    def __exit__(self, *exc: Any) -> None:
        self.sim.log.__exit__(*exc)
        self.sim.fake_mode.__exit__(*exc)


def _parameters_reached(loss: torch.Tensor) -> Iterator[torch.Tensor]:
    """The leaf tensors backward() would give a gradient: AccumulateGrad nodes of the graph."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            yield node.variable
        stack.extend(next_node for next_node, _ in node.next_functions)


def simulate_cuda(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int] = (9, 0)) -> SimulatedCuda:
    """Install the stand-ins for one test; monkeypatch undoes them."""
    import safetensors.torch

    import mnistsum_cli.store.tensorfiles
    import mnistsum_cli.training.checkpoint
    import mnistsum_cli.training.loop
    from mnistsum_cli.training.models import build_model

    sim = SimulatedCuda(OpLog(), SafetensorsStore(), FakeTensorMode(allow_non_fake_inputs=True), [], [])

    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability >= (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    def record_sum_logits(module, inputs, outputs) -> None:
        sim.sum_logit_dtypes.append(outputs[1].dtype)

    def build_real_model(arch: str) -> torch.nn.Module:
        # Fake parameters cannot be moved by Module.to() (it swaps them, which fakes refuse), so
        # the model is built with real CPU weights; its .to(device) and all else is the real code.
        with unset_fake_temporarily():
            model = build_model(arch)
        model.register_forward_hook(record_sum_logits)
        return model

    monkeypatch.setattr(mnistsum_cli.training.loop, "build_model", build_real_model)
    monkeypatch.setattr(mnistsum_cli.training.checkpoint, "build_model", build_real_model)
    monkeypatch.setattr(
        mnistsum_cli.training.loop, "epoch_generator", lambda seed, epoch, device: DeviceGenerator(device)
    )

    def check_generator(draw):
        def draw_checked(*args, generator=None, device=None, **kwargs):
            if generator is not None and generator.device.type != torch.device(device or "cpu").type:
                sim.log.problems.append(f"{draw.__name__}: generator on {generator.device}, drawing on {device}")
            return draw(*args, device=device, **kwargs)

        return draw_checked

    for draw in ("randperm", "randint", "rand"):
        monkeypatch.setattr(torch, draw, check_generator(getattr(torch, draw)))

    def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        sim.loss_dtypes.append(loss.dtype)
        for param in _parameters_reached(loss):
            if param.grad is None:
                param.grad = torch.empty_like(param)

    monkeypatch.setattr(torch.Tensor, "backward", backward)

    real_tolist = torch.Tensor.tolist

    def tolist(tensor: torch.Tensor) -> Any:
        if not isinstance(tensor, FakeTensor):
            return real_tolist(tensor)
        if tensor.device.type == "cuda":
            sim.log.host_reads.append((sim.log.phase, f"tolist at {_package_frame()}"))
        with unset_fake_temporarily():
            return real_tolist(torch.zeros(tensor.shape, dtype=tensor.dtype))

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(safetensors.torch, "save", sim.store.save)
    monkeypatch.setattr(mnistsum_cli.store.tensorfiles, "parse_safetensors", sim.store.parse)
    return sim


def checkpoint_metadata(store: SafetensorsStore, path: Path) -> dict[str, Any]:
    _, raw = store.files[path.read_text()]
    return {key: json.loads(value) for key, value in raw.items()}


OPS_PER_STEP: dict[str, int] = collections.OrderedDict()  # printed at the end of the test session
