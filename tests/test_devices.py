"""Device policy: choosing the device, training precision, reproducibility, and the errors a
GPU user can meet (no such GPU, out of memory) as one line, all checkable without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import VAL_SIZE, FakeMnist
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.paths import DataDir, RunDir
from mnistsum_cli.training.devices import autocast_dtype, configure_reproducibility, precision_name, select_device

REPO = Path(__file__).resolve().parents[1]
CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """Pretend the machine has two CUDA devices; returns the devices made current."""
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    return current


@pytest.mark.parametrize("gpu, expected", [(None, CUDA0), (0, CUDA0), (1, CUDA1)])
def test_the_chosen_gpu_becomes_the_current_device(two_gpus: list, gpu, expected: torch.device) -> None:
    device, notice = select_device(gpu, cpu=False)
    assert device == expected and notice is None
    assert two_gpus == [expected], "allocations and capability checks would go to the wrong GPU"


@pytest.mark.parametrize("gpu", [-1, 2])
def test_no_such_gpu(two_gpus: list, gpu: int) -> None:
    with pytest.raises(BadOption, match=f"--gpu {gpu}"):
        select_device(gpu, cpu=False)
    assert two_gpus == []


def test_cpu_flag_never_touches_cuda(two_gpus: list) -> None:
    assert select_device(None, cpu=True) == (torch.device("cpu"), None)
    assert two_gpus == []


@pytest.mark.parametrize(
    "capability, amp, expected",
    [
        ((9, 0), True, torch.bfloat16),
        ((8, 0), True, torch.bfloat16),
        ((7, 5), True, torch.float16),
        ((6, 0), True, torch.float16),
        ((9, 0), False, None),
    ],
)
def test_training_precision_follows_the_gpu(monkeypatch: pytest.MonkeyPatch, capability, amp: bool, expected) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert autocast_dtype(CUDA0, amp) is expected


def test_cpu_trains_in_fp32() -> None:
    assert autocast_dtype(torch.device("cpu"), amp=True) is None
    assert [precision_name(d) for d in (torch.bfloat16, torch.float16, None)] == ["bf16", "fp16", "fp32"]


def test_cuda_is_fast_by_default_and_exact_when_asked(global_flags) -> None:
    configure_reproducibility(CUDA0, deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    configure_reproducibility(CUDA0, deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()


def test_cpu_reproducibility_is_left_alone(global_flags) -> None:
    torch.backends.cudnn.benchmark = False
    configure_reproducibility(torch.device("cpu"), deterministic=False)
    assert not torch.backends.cudnn.benchmark


def test_out_of_memory_is_one_line_with_advice(
    fake_mnist: FakeMnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnistsum_cli.training.loop
    import mnistsum_cli.training.session
    from mnistsum_cli.data.mnist import load_mnist, resolve_source
    from mnistsum_cli.data.prepare import PrepareOptions, prepare

    data = DataDir(tmp_path / "data")
    prepare(load_mnist(resolve_source(fake_mnist.root)), PrepareOptions(val_size=VAL_SIZE), data)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(mnistsum_cli.training.loop, "train", out_of_memory)
    with pytest.raises(MnistsumError, match="smaller --batch-size"):
        mnistsum_cli.training.session.run_training(
            TrainConfig(batch_size=4096), SplitData(data), RunDir(tmp_path / "run"), torch.device("cpu")
        )


def test_bench_refuses_a_negative_gpu() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench.py"), "--gpu", "-1"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--gpu -1" in lines[0], result.stderr
