"""The real stages on a real `cuda:0`: what the simulated device (tests/simulated_cuda.py) cannot
show. Fake tensors check devices, dtypes and layouts, but run no kernel: they cannot tell whether
cuDNN/cuBLAS give bit-exact reruns, whether bf16 training still learns, whether GPU and CPU
evaluations agree, whether torch.compile and NCCL work, or what running out of memory looks like.

Marked `cuda` and skipped where torch.cuda.is_available() is false (CI runs on the CPU);
`bench/gpu_check.py` runs them with `pytest -m cuda` on the GPU machine. The real-MNIST tests
read $MNISTSUM_TEST_MNIST (gpu_check.py points it at the unpacked copy it carries).
"""

from __future__ import annotations

import json
import math
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import VAL_SIZE, FakeMnist, assert_one_line_error, make_fake_mnist, torchrun_command, torchrun_env
from mnistsum_cli.data.mnist import load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.data.tensors import split_tensors
from mnistsum_cli.evaluation.evaluate import evaluate_model
from mnistsum_cli.evaluation.predict import predict_digits
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.paths import CHECKPOINT_FORMAT, DataDir, RunDir
from mnistsum_cli.store.tensorfiles import read_safetensors
from mnistsum_cli.training.checkpoint import load_model
from mnistsum_cli.training.devices import autocast_dtype, precision_name
from mnistsum_cli.training.inference import predict
from mnistsum_cli.training.loop import load_train_data, train
from mnistsum_cli.training.models import ARCHITECTURES
from mnistsum_cli.training.session import run_training
from test_train import InterruptAfter, assert_same_tensors

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.usefixtures("global_flags"),  # train() sets process-wide cuDNN and determinism switches
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is false"),
]

REPOSITORY = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)
SHORT = TrainConfig(arch="fastnet-small", epochs=3, batch_size=64, lr=4e-3, max_shift=2, seed=0)
DETERMINISTIC = SHORT.with_overrides(deterministic=True)


def prepared(mnist_root: Path, folder: Path, val_size: int | None = VAL_SIZE) -> DataDir:
    options = PrepareOptions(seed=0) if val_size is None else PrepareOptions(seed=0, val_size=val_size)
    data_dir = DataDir(folder / "data")
    prepare(load_mnist(resolve_source(mnist_root)), options, data_dir)
    return data_dir


@pytest.fixture(scope="module")
def data_dir(fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory) -> DataDir:
    return prepared(fake_mnist.root, tmp_path_factory.mktemp("cuda"))


def history(run: RunDir) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r.items() if k not in ("seconds", "steps")}
        for r in json.loads(run.history.read_text())["epochs"]
    ]


# --------------------------------------------------------------------------- precision


class DtypeRecorder:
    """Forward hooks on every model train() and load_model() build: conv output dtypes and sum
    logit dtypes, apart for training (model.training) and evaluation; cross-entropy's dtypes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import mnistsum_cli.training.checkpoint
        import mnistsum_cli.training.loop

        self.seen: dict[tuple[str, bool], set[torch.dtype]] = {}
        original_build = mnistsum_cli.training.loop.build_model
        original_cross_entropy = nn.functional.cross_entropy

        def build_model(arch: str) -> nn.Module:
            model = original_build(arch)
            model.register_forward_hook(lambda module, inputs, out: self._add("sum logits", module, out[1]))
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    module.register_forward_hook(lambda module, inputs, out: self._add("conv", module, out))
            return model

        def cross_entropy(logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = original_cross_entropy(logits, *args, **kwargs)
            self.seen.setdefault(("loss", torch.is_grad_enabled()), set()).add(loss.dtype)
            return loss

        monkeypatch.setattr(mnistsum_cli.training.loop, "build_model", build_model)
        monkeypatch.setattr(mnistsum_cli.training.checkpoint, "build_model", build_model)
        monkeypatch.setattr(nn.functional, "cross_entropy", cross_entropy)

    def _add(self, what: str, module: nn.Module, output: torch.Tensor) -> None:
        self.seen.setdefault((what, module.training), set()).add(output.dtype)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_trains_and_evaluates(arch: str, data_dir: DataDir, tmp_path: Path, monkeypatch) -> None:
    recorder = DtypeRecorder(monkeypatch)
    config = TrainConfig(arch=arch, epochs=1, batch_size=64, lr=2e-3, seed=0)
    run = RunDir(tmp_path / "run")
    trained = run_training(config, SplitData(data_dir), run, GPU)
    assert trained.epoch == 1
    assert all(math.isfinite(value) for value in history(run)[0].values())
    metrics = evaluate_model("test", SplitData(data_dir), run, GPU)
    assert (metrics["device"], metrics["precision"]) == (str(GPU), "fp32")
    assert 0 <= metrics["digit_accuracy"] <= 1 and math.isfinite(metrics["sum_loss"])

    training_dtype = autocast_dtype(GPU, amp=True)  # bf16 on Ampere and newer
    assert recorder.seen[("conv", True)] == {training_dtype}, "autocast did not engage in training"
    assert recorder.seen[("sum logits", True)] == {torch.float32}
    assert recorder.seen[("loss", True)] == {torch.float32}
    assert recorder.seen[("conv", False)] == {torch.float32}, "validation/evaluation must run in fp32"
    assert recorder.seen[("sum logits", False)] == {torch.float32}
    assert recorder.seen[("loss", False)] == {torch.float32}
    assert json.loads(run.setup_file.read_text())["precision"] == precision_name(training_dtype)


# --------------------------------------------------------------------------- --deterministic


@pytest.fixture(scope="module")
def deterministic_runs(data_dir: DataDir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two uninterrupted --deterministic runs and one interrupted after epoch 1 and resumed,
    with every warning raised meanwhile."""
    root = tmp_path_factory.mktemp("deterministic")
    runs = {name: RunDir(root / name) for name in ("first", "second", "resumed")}
    data = load_train_data(SplitData(data_dir), GPU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(DETERMINISTIC, data, runs["first"], GPU)
        train(DETERMINISTIC, data, runs["second"], GPU)
        with pytest.raises(KeyboardInterrupt):
            train(DETERMINISTIC, data, runs["resumed"], GPU, reporter=InterruptAfter(epoch=1))
        train(DETERMINISTIC, data, runs["resumed"], GPU, resume=True)
    return {**runs, "warnings": [str(w.message) for w in caught]}


def test_deterministic_runs_agree_exactly(deterministic_runs) -> None:
    first, second = deterministic_runs["first"], deterministic_runs["second"]
    assert_same_tensors(first.checkpoint, second.checkpoint)
    assert_same_tensors(first.model, second.model)
    assert history(first) == history(second)


def test_deterministic_resume_equals_uninterrupted(deterministic_runs) -> None:
    first, resumed = deterministic_runs["first"], deterministic_runs["resumed"]
    assert_same_tensors(first.checkpoint, resumed.checkpoint)
    assert_same_tensors(first.model, resumed.model)
    assert history(first) == history(resumed)


def test_deterministic_run_uses_the_fused_optimizer(deterministic_runs) -> None:
    _, meta = read_safetensors(deterministic_runs["first"].checkpoint, "train", CHECKPOINT_FORMAT, metadata_only=True)
    assert all(group["fused"] for group in meta["param_groups"])


def test_deterministic_run_meets_no_nondeterministic_op(deterministic_runs) -> None:
    """torch.use_deterministic_algorithms(True, warn_only=True) warns for each op that has no
    deterministic CUDA kernel; such an op would make --deterministic a false promise."""
    alerts = [message for message in deterministic_runs["warnings"] if "deterministic" in message]
    assert not alerts, "\n".join(alerts)


# --------------------------------------------------------------------------- moving checkpoints


def test_checkpoints_move_between_cpu_and_gpu(data_dir: DataDir, tmp_path: Path) -> None:
    """Epoch 1 on the CPU, epoch 2 on the GPU, epoch 3 on the CPU again, through --resume."""
    run = RunDir(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(SHORT, load_train_data(SplitData(data_dir), CPU), run, CPU, reporter=InterruptAfter(epoch=1))
    with pytest.raises(KeyboardInterrupt):
        train(SHORT, load_train_data(SplitData(data_dir), GPU), run, GPU, resume=True, reporter=InterruptAfter(epoch=2))
    state = train(SHORT, load_train_data(SplitData(data_dir), CPU), run, CPU, resume=True)
    assert state.epoch == 3
    records = history(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(value) for record in records for value in record.values())
    assert records[2]["train_loss"] < records[0]["train_loss"]
    tensors, _ = read_safetensors(run.checkpoint, "train", CHECKPOINT_FORMAT)
    assert all(t.device == CPU and bool(torch.isfinite(t.float()).all()) for t in tensors.values())


# --------------------------------------------------------------------------- real MNIST: accuracy, GPU vs CPU


@pytest.fixture(scope="module")
def mnist_run(shared_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[DataDir, RunDir]:
    """`train --gpu 0 --epochs 3` (the default preset otherwise, cuDNN autotuning on) on real MNIST."""
    from conftest import _main

    root = tmp_path_factory.mktemp("mnist")
    data_dir = prepared(shared_mnist, root, val_size=None)
    run = RunDir(root / "artifacts")
    assert _main("train", "--gpu", 0, "--epochs", 3, "--data", data_dir.root, "--artifacts", run.root) == 0
    return data_dir, run


def test_default_gpu_run_is_accurate(mnist_run, run_cli) -> None:
    """The autotuned run is not bit-exact, so it is held to accuracy only (3 of the default's 10
    epochs: at least 98 % on the test split)."""
    data_dir, run = mnist_run
    code, out, err = run_cli("evaluate", "--gpu", 0, "--data", data_dir.root, "--artifacts", run.root, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["rows"] == 10_000 and metrics["device"] == str(GPU)
    assert metrics["digit_accuracy"] >= 0.98 and metrics["sum_accuracy"] >= 0.98, metrics


def test_gpu_and_cpu_evaluations_agree(mnist_run) -> None:
    data_dir, run = mnist_run
    prepared_data = SplitData(data_dir)
    dataset, mnist = prepared_data.dataset, prepared_data.mnist
    gpu, cpu = (
        predict(load_model(run.model, device)[0], split_tensors(dataset, mnist, "test", device))
        for device in (GPU, CPU)
    )
    assert len(gpu.digit) == 10_000
    assert int((gpu.digit.cpu() == cpu.digit).sum()) >= 9_999
    assert int((gpu.sum.cpu() == cpu.sum).sum()) >= 9_999


def test_predict_agrees_with_evaluate_row_for_row(mnist_run, run_cli) -> None:
    """`predict` (predict_digits, on every test row) against `evaluate` (predict), both on the GPU;
    then the CLI's `predict --index` on the first rows evaluate got wrong."""
    data_dir, run = mnist_run
    prepared_data = SplitData(data_dir)
    dataset, mnist = prepared_data.dataset, prepared_data.mnist
    test = split_tensors(dataset, mnist, "test", GPU)
    model, _ = load_model(run.model, GPU)
    evaluated = predict(model, test)
    images = torch.from_numpy(mnist.images["test"][dataset.splits["test"].image_index])
    predicted = [
        row
        for start in range(0, len(test), 2048)
        for row in predict_digits(model, images[start : start + 2048], test.numbers[start : start + 2048].cpu(), GPU)
    ]
    assert [row["digit"] for row in predicted] == evaluated.digit.tolist()
    assert [row["sum"] for row in predicted] == evaluated.sum.tolist()

    code, out, err = run_cli("evaluate", "--gpu", 0, "--data", data_dir.root, "--artifacts", run.root, "--json")
    assert code == 0, err
    for wrong in json.loads(out)["misclassified"][:3]:
        code, out, err = run_cli(
            "predict", "--index", wrong["row"], "--gpu", 0, "--data", data_dir.root, "--artifacts", run.root, "--json"
        )
        assert code == 0, err
        row = json.loads(out)
        assert (row["digit"], row["sum"]) == (wrong["predicted_digit"], wrong["predicted_sum"])


# --------------------------------------------------------------------------- compile, NCCL, out of memory


def test_compiled_training_runs(data_dir: DataDir, tmp_path: Path, run_cli) -> None:
    artifacts = tmp_path / "artifacts"
    args = (
        "--arch",
        "fastnet-small",
        "--epochs",
        1,
        "--batch-size",
        64,
        "--data",
        data_dir.root,
        "--artifacts",
        artifacts,
    )
    code, out, err = run_cli("train", "--gpu", 0, "--compile", *args)
    assert code == 0, err
    assert json.loads(RunDir(artifacts).setup_file.read_text())["config"]["compile"] is True
    assert all(math.isfinite(value) for value in history(RunDir(artifacts))[0].values())


def test_torchrun_with_nccl_trains(data_dir: DataDir, tmp_path: Path) -> None:
    env = torchrun_env()
    command = torchrun_command(
        1,
        "train",
        "--arch",
        "fastnet-small",
        "--epochs",
        1,
        "--batch-size",
        64,
        "--data",
        data_dir.root,
        "--artifacts",
        "artifacts",
    )
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "cuda:0 x 1 processes" in result.stdout
    config = json.loads(RunDir(tmp_path / "artifacts").setup_file.read_text())
    assert (config["device"], config["backend"], config["world_size"]) == ("cuda:0", "nccl", 1)


def test_a_batch_that_cannot_fit_is_one_line(tmp_path: Path, run_cli) -> None:
    """20 000 rows in one batch of fastnet-wide need gigabytes of activations; the allocator is
    capped at 1 GiB above what is in use, so the batch cannot fit on any GPU."""
    data_dir = prepared(make_fake_mnist(tmp_path / "mnist", n_train=20_080, n_test=100).root, tmp_path)
    torch.cuda.empty_cache()
    cap = (torch.cuda.memory_reserved(GPU) + 2**30) / torch.cuda.get_device_properties(GPU).total_memory
    torch.cuda.set_per_process_memory_fraction(cap, GPU)
    try:
        code, out, err = run_cli(
            "train",
            "--gpu",
            0,
            "--arch",
            "fastnet-wide",
            "--epochs",
            1,
            "--batch-size",
            20_000,
            "--data",
            data_dir.root,
            "--artifacts",
            tmp_path / "artifacts",
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, GPU)
        torch.cuda.empty_cache()
    assert code == 1
    assert "ran out of memory with batch size 20000" in assert_one_line_error(err, out)
