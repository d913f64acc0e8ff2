"""The CUDA path on a simulated cuda:0 (see simulated_cuda.py): training, validation,
checkpointing, resume, evaluate and predict, for every architecture.

Checked: no op mixes CPU and CUDA operands; no host sync inside the step loop (the per-step
metrics stay on the device until the epoch ends, and every step is recorded); the fused AdamW
operands share size and strides, fresh and after resume; losses and sum logits are fp32, convs
run in the autocast dtype; everything written to safetensors is a CPU tensor. The aten ops per
training step (about the kernel launches) are printed at the end of the session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import VAL_SIZE, FakeMnist
from mnistsum_cli.data.mnist import Mnist, load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.evaluation.evaluate import evaluate_model
from mnistsum_cli.evaluation.predict import predict_row
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.paths import DataDir, RunDir
from mnistsum_cli.training.loop import TrainData, load_train_data, train
from mnistsum_cli.training.models import ARCHITECTURES
from simulated_cuda import CUDA, OPS_PER_STEP, PhaseReporter, SimulatedCuda, checkpoint_metadata, simulate_cuda

BATCH = 64  # the fixture's 320 training rows: 5 steps an epoch


@pytest.fixture(scope="module")
def prepared(fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory) -> tuple[DataDir, Mnist]:
    mnist = load_mnist(resolve_source(fake_mnist.root))
    data = DataDir(tmp_path_factory.mktemp("simulated") / "data")
    prepare(mnist, PrepareOptions(val_size=VAL_SIZE), data)
    return data, mnist


def train_data(prepared: tuple[DataDir, Mnist], device: torch.device) -> TrainData:
    return load_train_data(SplitData(prepared[0], mnist=prepared[1]), device)


def assert_clean(sim: SimulatedCuda) -> None:
    """No mixed-device op, no fused-layout mismatch, no generator on the wrong device, no host
    sync in the step loop, fp32 losses and sum logits, CPU tensors in every safetensors file."""
    assert not sim.log.problems, "\n".join(sorted(set(sim.log.problems)))
    in_steps = [where for phase, where in sim.log.host_reads if phase == "step"]
    assert not in_steps, f"host syncs inside the step loop: {sorted(set(in_steps))}"
    assert set(sim.loss_dtypes) <= {torch.float32} and sim.loss_dtypes, sim.loss_dtypes
    assert set(sim.sum_logit_dtypes) == {torch.float32}, sim.sum_logit_dtypes
    assert sim.store.written_devices() <= {"cpu"}, sim.store.written_devices()


def train_interrupted_then_resumed(
    sim: SimulatedCuda, config: TrainConfig, data: TrainData, run: RunDir
) -> PhaseReporter:
    """Epoch 1, Ctrl-C after its files are saved, then `--resume` for epoch 2, as a user would."""
    with pytest.raises(KeyboardInterrupt):
        train(config, data, run, CUDA, reporter=PhaseReporter(sim.log, interrupt_after=1))
    sim.log.phase = "resume"
    resumed = PhaseReporter(sim.log)
    train(config, data, run, CUDA, resume=True, reporter=resumed)
    return resumed


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_stage_on_cuda(arch: str, prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, mnist = prepared
    run = RunDir(tmp_path / "artifacts")
    config = TrainConfig(arch=arch, epochs=2, batch_size=BATCH)
    sim = simulate_cuda(monkeypatch)
    with sim.running():
        reporter = train_interrupted_then_resumed(sim, config, train_data(prepared, CUDA), run)
        sim.log.phase = "evaluate"
        metrics = evaluate_model("test", SplitData(data, mnist=mnist), run, CUDA)
        sim.log.phase = "predict"
        predict_row(3, "test", None, SplitData(data, mnist=mnist), run, CUDA)
    assert_clean(sim)

    assert sim.log.count("step", "_fused_adamw_") > 0, "the fused kernel did not run"
    assert sim.log.dtypes("step", "convolution") == {"torch.bfloat16"}, "training convs are not bf16"
    for phase in ("epoch end", "evaluate", "predict"):
        assert sim.log.dtypes(phase, "convolution") == {"torch.float32"}, f"{phase} is not fp32"
    assert metrics["device"] == "cuda:0" and metrics["precision"] == "fp32"
    assert json.loads(run.setup_file.read_text())["precision"] == "bf16"
    recorded = [row["step"] for record in json.loads(run.history.read_text())["epochs"] for row in record["steps"]]
    assert recorded == list(range(1, 11)), "2 epochs of 5 steps: per-step records lost or repeated across the resume"

    steps = reporter.ops_per_step[1:]  # the first also counts the epoch's permutation
    assert len(set(steps)) == 1, f"ops per step vary: {steps}"
    OPS_PER_STEP[arch] = steps[0]


def test_cpu_checkpoint_resumes_on_cuda(prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint saved by a CPU run whose optimizer used another kernel (foreach, as before
    the fused kernel became the CPU's too) continues on CUDA with the fused kernel, its moments
    and step counters on the GPU."""
    run = RunDir(tmp_path / "artifacts")
    config = TrainConfig(arch="fastnet", epochs=2, batch_size=BATCH)
    sim = simulate_cuda(monkeypatch)
    with sim.running():
        with pytest.raises(KeyboardInterrupt):
            train(
                config,
                train_data(prepared, torch.device("cpu")),
                run,
                torch.device("cpu"),
                reporter=PhaseReporter(sim.log, interrupt_after=1),
            )
        sim.store.edit_metadata(
            run.checkpoint, "param_groups", lambda groups: [{**g, "fused": None, "foreach": True} for g in groups]
        )
        sim.log.phase = "resume"
        train(config, train_data(prepared, CUDA), run, CUDA, resume=True, reporter=PhaseReporter(sim.log))
    assert_clean(sim)
    assert sim.log.count("step", "_fused_adamw_") > 0, "resumed on CUDA without the fused kernel"
    assert checkpoint_metadata(sim.store, run.checkpoint)["param_groups"][0]["fused"] is True


@pytest.mark.parametrize(
    "capability, overrides, conv_dtype, precision",
    [
        ((7, 5), {}, "torch.float16", "fp16"),  # pre-Ampere: fp16 with a grad scaler
        ((9, 0), {"amp": False, "channels_last": False}, "torch.float32", "fp32"),
        (
            (9, 0),
            {"max_rotation": 10.0, "max_zoom": 0.1, "label_smoothing": 0.1, "deterministic": True},
            "torch.bfloat16",
            "bf16",
        ),
    ],
    ids=["fp16-pre-ampere", "fp32-contiguous", "augmented-deterministic"],
)
def test_training_variants_on_cuda(
    capability, overrides, conv_dtype: str, precision: str, prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(tmp_path / "artifacts")
    config = TrainConfig(arch="fastnet", epochs=2, batch_size=BATCH, **overrides)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only=False: None)
    sim = simulate_cuda(monkeypatch, capability=capability)
    with sim.running():
        train_interrupted_then_resumed(sim, config, train_data(prepared, CUDA), run)
    assert_clean(sim)
    assert sim.log.dtypes("step", "convolution") == {conv_dtype}
    assert json.loads(run.setup_file.read_text())["precision"] == precision
    assert torch.backends.cudnn.benchmark is not config.deterministic
    if precision == "fp16":
        assert checkpoint_metadata(sim.store, run.checkpoint)["grad_scaler"]["scale"] > 0, "grad scaler not saved"
