"""Data-parallel training with 2 gloo processes on the CPU: under torchrun through the CLI, and
through torch.multiprocessing for interrupt/resume across world sizes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from conftest import VAL_SIZE, FakeMnist, assert_one_line_error, torchrun_command, torchrun_env, visible
from mnistsum_cli.cli.report import epoch_line
from mnistsum_cli.data.mnist import load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.paths import CHECKPOINT_FORMAT, MODEL_FORMAT, DataDir, RunDir
from mnistsum_cli.store.tensorfiles import read_safetensors
from mnistsum_cli.training.distributed import Group, RankFailed, process_group
from mnistsum_cli.training.loop import load_train_data, train
from mnistsum_cli.training.models import build_model
from test_train import InterruptAfter, Recorder, _tensors, assert_same_tensors

REPOSITORY = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CONFIG = TrainConfig(arch="fastnet-small", epochs=3, batch_size=64, lr=4e-3, max_shift=2, seed=0)
NO_BATCHNORM = TrainConfig(arch="lenet", epochs=1, batch_size=64, lr=2e-3, max_shift=2, seed=0)
RUN_FILES = {"model.safetensors", "checkpoint.safetensors", "history.json", "train_state.json", "config.json"}


@pytest.fixture(scope="module")
def data_dir(fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("distributed") / "data"
    prepare(load_mnist(resolve_source(fake_mnist.root)), PrepareOptions(seed=0, val_size=VAL_SIZE), DataDir(data))
    return data


def torchrun(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m mnistsum_cli ARGS`, one thread per process."""
    return subprocess.run(
        torchrun_command(2, *args),
        cwd=cwd,
        env=torchrun_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def as_torchrun_rank(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    """The environment torchrun gives rank `rank` of 2 (no process group: for checks made before joining)."""
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", 2)):
        monkeypatch.setenv(name, str(value))


def metadata(path: Path, expected_format: str) -> dict[str, Any]:
    return read_safetensors(path, "train", expected_format, metadata_only=True)[1]


# --------------------------------------------------------------------------- torchrun through the CLI


@pytest.fixture(scope="module")
def torchrun_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`torchrun --nproc-per-node 2 -m mnistsum_cli train --cpu` in an empty folder (read-only)."""
    cwd = tmp_path_factory.mktemp("torchrun")
    result = torchrun(
        cwd,
        "train",
        "--cpu",
        "--preset",
        "cpu",
        "--epochs",
        2,
        "--batch-size",
        64,
        "--data",
        data_dir,
        "--artifacts",
        "artifacts",
    )
    return cwd, result


def test_torchrun_writes_one_set_of_artifacts(torchrun_run) -> None:
    cwd, result = torchrun_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "error" not in result.stderr.lower(), result.stderr
    assert [p.name for p in cwd.iterdir()] == ["artifacts"]
    assert set(visible(cwd / "artifacts")) == RUN_FILES


def test_torchrun_history_is_what_rank0_reported(torchrun_run) -> None:
    cwd, result = torchrun_run
    history = json.loads((cwd / "artifacts" / "history.json").read_text())
    reported = [line.strip() for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert reported == [epoch_line(record, 2) for record in history["epochs"]], result.stdout
    assert result.stdout.count("trained 2 epochs on cpu x 2 processes") == 1, result.stdout


def test_torchrun_records_world_size(torchrun_run) -> None:
    cwd, _ = torchrun_run
    run = RunDir(cwd / "artifacts")
    expected = {"world_size": 2, "backend": "gloo"}
    for record in (
        json.loads(run.history.read_text()),
        json.loads(run.setup_file.read_text()),
        json.loads(run.train_state.read_text()),
        metadata(run.checkpoint, CHECKPOINT_FORMAT),
        metadata(run.model, MODEL_FORMAT),
    ):
        assert {key: record.get(key) for key in expected} == expected
    assert [r["world_size"] for r in json.loads(run.history.read_text())["epochs"]] == [2, 2]


def test_torchrun_records_every_step_once(torchrun_run) -> None:
    cwd, _ = torchrun_run
    epochs = json.loads((cwd / "artifacts" / "history.json").read_text())["epochs"]
    assert [row["step"] for record in epochs for row in record["steps"]] == list(range(1, 11))  # 2 epochs of 5 steps
    for record in epochs:
        mean = sum(row["train_sum_loss"] for row in record["steps"]) / len(record["steps"])
        assert mean == pytest.approx(record["train_sum_loss"], rel=1e-5)


def test_torchrun_model_evaluates_to_its_saved_val_metrics(torchrun_run, data_dir: Path, run_cli) -> None:
    cwd, _ = torchrun_run
    run = RunDir(cwd / "artifacts")
    code, out, err = run_cli(
        "evaluate", "--split", "val", "--cpu", "--data", data_dir, "--artifacts", run.root, "--json"
    )
    assert code == 0, err
    evaluation = json.loads(out)
    saved = metadata(run.model, MODEL_FORMAT)
    kept = json.loads(run.history.read_text())["epochs"][saved["epoch"] - 1]
    assert evaluation["rows"] == VAL_SIZE
    assert evaluation["digit_accuracy"] == pytest.approx(saved["val_digit_accuracy"], abs=1e-6)
    assert evaluation["sum_accuracy"] == pytest.approx(saved["val_sum_accuracy"], abs=1e-6)
    assert evaluation["digit_loss"] == pytest.approx(kept["val_digit_loss"], rel=1e-5)
    assert evaluation["sum_loss"] == pytest.approx(kept["val_sum_loss"], rel=1e-5)


def test_other_commands_are_refused_under_torchrun(run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    as_torchrun_rank(monkeypatch, 0)
    code, out, err = run_cli("status", "--data", tmp_path, "--artifacts", tmp_path)
    assert code == 2
    assert "only `train` runs under torchrun" in assert_one_line_error(err, out)


def test_gpu_is_refused_under_torchrun(
    run_cli, monkeypatch: pytest.MonkeyPatch, data_dir: Path, tmp_path: Path
) -> None:
    as_torchrun_rank(monkeypatch, 0)
    code, out, err = run_cli("train", "--gpu", "0", "--data", data_dir, "--artifacts", tmp_path / "artifacts")
    assert code == 2
    assert "--gpu does not go with torchrun" in assert_one_line_error(err, out)
    assert not list(tmp_path.iterdir())


def test_ranks_other_than_0_stay_quiet_on_errors(run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    as_torchrun_rank(monkeypatch, 1)
    assert run_cli("status", "--data", tmp_path) == (2, "", "")
    assert run_cli("train", "--epochs", "0") == (2, "", "")


def test_batches_split_into_equal_shares() -> None:
    Group(rank=1, world_size=2, backend="gloo").check_batch(4)
    for batch_size, world_size in [(3, 2), (2, 2), (64, 3)]:
        with pytest.raises(BadOption, match=f"multiple of {world_size}"):
            Group(rank=0, world_size=world_size, backend="gloo").check_batch(batch_size)


@pytest.mark.parametrize("rows, world_size", [(64, 2), (80, 3), (5, 4)])
def test_shards_cover_every_row_once(rows: int, world_size: int) -> None:
    shards = [Group(rank=rank, world_size=world_size).shard(torch.arange(rows)) for rank in range(world_size)]
    assert torch.equal(torch.cat(shards), torch.arange(rows))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_ddp_keeps_batchnorm_statistics_local() -> None:
    """DDP must not broadcast buffers at each forward (`average_buffers` averages them once an
    epoch), whatever this torch calls the switch, and without a deprecation warning."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            wrapped = Group(rank=0, world_size=1, backend="gloo").wrap(build_model("fastnet-small"))
        assert wrapped.broadcast_buffers is False
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- interrupt and resume, 1 <-> 2 processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(rank: int, port: int, data_dir: str, root: str) -> None:
    """One of 2 ranks, joined through the same environment torchrun sets."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    folders = Path(root)
    with process_group(None, True, notify=print) as (group, device):
        assert group == Group(rank=rank, world_size=2, backend="gloo")
        data = load_train_data(SplitData(DataDir(Path(data_dir))), device)

        def fails_on_rank1() -> None:
            if group.rank == 1:
                raise MnistsumError("only rank 1 fails")

        with pytest.raises(RankFailed, match="^rank 1: only rank 1 fails$"):
            group.agree(fails_on_rank1)

        train(CONFIG, data, RunDir(folders / "straight"), device, group=group)
        interrupted = RunDir(folders / "interrupted")
        with pytest.raises(KeyboardInterrupt):
            train(CONFIG, data, interrupted, device, reporter=InterruptAfter(epoch=1), group=group)
        if group.is_main:  # a copy for the one-process resume; the ranks only read it until epoch 2 ends
            shutil.copytree(interrupted.root, folders / "interrupted_copy")
        reporter = Recorder()
        train(CONFIG, data, interrupted, device, resume=True, reporter=reporter, group=group)
        assert reporter.ended == [2, 3]
        train(CONFIG, data, RunDir(folders / "single_interrupted"), device, resume=True, group=group)
        train(NO_BATCHNORM, data, RunDir(folders / "no_batchnorm"), device, group=group)


@pytest.fixture(scope="module")
def spawned(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs of 2 spawned ranks (see `worker`), after a 1-process run interrupted after epoch 1."""
    root = tmp_path_factory.mktemp("spawned")
    data = load_train_data(SplitData(DataDir(data_dir)), CPU)
    with pytest.raises(KeyboardInterrupt):
        train(CONFIG, data, RunDir(root / "single_interrupted"), CPU, reporter=InterruptAfter(epoch=1))
    torch.multiprocessing.spawn(worker, args=(free_port(), str(data_dir), str(root)), nprocs=2)
    return root


def history(run: RunDir) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(run.history.read_text())["epochs"]]


def test_two_process_resume_equals_uninterrupted(spawned: Path) -> None:
    straight, resumed = RunDir(spawned / "straight"), RunDir(spawned / "interrupted")
    assert_same_tensors(straight.checkpoint, resumed.checkpoint)
    assert_same_tensors(straight.model, resumed.model)
    assert history(straight) == history(resumed)
    assert [r["world_size"] for r in history(resumed)] == [2, 2, 2]


def test_two_process_checkpoint_resumes_in_one_process(spawned: Path, data_dir: Path) -> None:
    run = RunDir(spawned / "interrupted_copy")
    assert metadata(run.checkpoint, CHECKPOINT_FORMAT)["epoch"] == 1
    state = train(CONFIG, load_train_data(SplitData(DataDir(data_dir)), CPU), run, CPU, resume=True)
    assert state.epoch == CONFIG.epochs
    assert [r["world_size"] for r in history(run)] == [2, 1, 1]
    assert metadata(run.checkpoint, CHECKPOINT_FORMAT)["world_size"] == 1


def test_one_process_checkpoint_resumes_in_two_processes(spawned: Path) -> None:
    run = RunDir(spawned / "single_interrupted")
    assert [r["world_size"] for r in history(run)] == [1, 2, 2]
    assert metadata(run.checkpoint, CHECKPOINT_FORMAT)["epoch"] == CONFIG.epochs


def test_without_batchnorm_one_and_two_processes_agree_to_rounding(
    spawned: Path, data_dir: Path, tmp_path: Path
) -> None:
    """LeNet has no BatchNorm: 2 processes compute the 1-process update up to the order of the
    gradient sums (each rank sums its 32 rows, then the ranks' means are averaged)."""
    run = RunDir(tmp_path / "single")
    train(NO_BATCHNORM, load_train_data(SplitData(DataDir(data_dir)), CPU), run, CPU)
    one, two = _tensors(run.checkpoint), _tensors(RunDir(spawned / "no_batchnorm").checkpoint)
    assert set(one) == set(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    # rank 0 records the figures of the whole batch, not of its own 32 rows
    steps_one, steps_two = (
        [row for r in history(folder) for row in r["steps"]] for folder in (run, RunDir(spawned / "no_batchnorm"))
    )
    assert [row["step"] for row in steps_two] == [row["step"] for row in steps_one] == list(range(1, 6))
    for row_one, row_two in zip(steps_one, steps_two):
        for key in ("train_digit_loss", "train_sum_loss"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-4), (row_one["step"], key)
        for key in ("train_digit_accuracy", "train_sum_accuracy"):
            assert row_two[key] == pytest.approx(row_one[key], abs=1 / 64 + 1e-9), (row_one["step"], key)


def test_one_and_two_processes_reach_comparable_accuracy(spawned: Path, data_dir: Path, tmp_path: Path) -> None:
    """FastNet with BatchNorm: each rank normalises over its 32 rows instead of all 64, so the runs
    part ways from the first step, but learn alike: same permutation, augmentation and schedule.
    Losses are averages over 320 and 80 rows and agree within 2 % (measured: 0.5 %); accuracy on
    80 validation rows after 15 steps moves in steps of 1.25 points and swings widely, so it is
    only held within 25 points here (measured: 20 at epoch 3) -- the real-MNIST comparison is in
    docs/performance.md."""
    run = RunDir(tmp_path / "single")
    train(CONFIG, load_train_data(SplitData(DataDir(data_dir)), CPU), run, CPU)
    one, two = history(run), history(RunDir(spawned / "straight"))
    for record_one, record_two in zip(one, two):
        for key in ("train_loss", "val_loss"):
            assert record_two[key] == pytest.approx(record_one[key], rel=0.02), (record_one["epoch"], key)
    best_one, best_two = (max(r["val_digit_accuracy"] for r in records) for records in (one, two))
    assert abs(best_one - best_two) <= 0.25
