"""Shared fixtures: a small synthetic MNIST written as real IDX files, a CLI runner, and the
path of the real MNIST copy beside the repository (for the end-to-end test)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from mnistsum_cli import terminal
from mnistsum_cli.data.mnist import MNIST_DIR_ENV, RAW_FILES
from mnistsum_cli.store.journal import GENERATION, JOURNAL
from mnistsum_cli.store.locks import LOCK
from mnistsum_cli.store.paths import RunDir
from mnistsum_cli.store.tensorfiles import safetensors_bytes
from mnistsum_cli.store.transactions import commit
from mnistsum_cli.store.writes import TEMP_PREFIX

IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
N_TRAIN = 400
N_TEST = 120
VAL_SIZE = 80  # what the CLI tests pass as --val-size (the default 5000 exceeds N_TRAIN)
TEST_MNIST_ENV = "MNISTSUM_TEST_MNIST"

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutate(content: bytes, cut: int, flips: list[int]) -> bytes:
    """`content` less its last `cut` bytes, with the given bits flipped (for fuzzing readers)."""
    data = bytearray(content[: max(0, len(content) - cut)])
    for bit in flips:
        if data:
            position = bit % (8 * len(data))
            data[position // 8] ^= 1 << (position % 8)
    return bytes(data)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread by default: on a small, busy machine torch's thread pool contends
    badly with other processes (50x slower on tiny batches). $MNISTSUM_TEST_THREADS overrides."""
    import torch

    torch.set_num_threads(int(os.environ.get("MNISTSUM_TEST_THREADS", "1")))


# --------------------------------------------------------------------------- IDX files


def idx_images(images: np.ndarray) -> bytes:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return struct.pack(">IIII", IMAGE_MAGIC, *images.shape) + images.tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    return struct.pack(">II", LABEL_MAGIC, len(labels)) + labels.tobytes()


@dataclass(frozen=True)
class FakeMnist:
    """A synthetic MNIST on disk: `root` holds MNIST/raw/*-ubyte."""

    root: Path
    images: dict  # "train"/"test" -> uint8 [N, 28, 28]
    labels: dict  # "train"/"test" -> uint8 [N]

    @property
    def raw_dir(self) -> Path:
        return self.root / "MNIST" / "raw"


def write_mnist(root: Path, images: dict, labels: dict) -> FakeMnist:
    """Write the four IDX files torchvision.datasets.MNIST reads into root/MNIST/raw."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "train-images-idx3-ubyte").write_bytes(idx_images(images["train"]))
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_labels(labels["train"]))
    (raw / "t10k-images-idx3-ubyte").write_bytes(idx_images(images["test"]))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(idx_labels(labels["test"]))
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW_FILES)
    return FakeMnist(root=Path(root), images=images, labels=labels)


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 uint8 images: dim noise plus a bright 6x6 block whose grid cell encodes the digit."""
    n = len(labels)
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, digit in enumerate(labels):
        row, col = 2 + 8 * (int(digit) // 4), 1 + 7 * (int(digit) % 4)
        images[i, row : row + 6, col : col + 6] = rng.integers(200, 256, size=(6, 6), dtype=np.uint8)
    return images


def make_fake_mnist(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 1234) -> FakeMnist:
    rng = np.random.default_rng(seed)
    labels = {
        "train": rng.permutation(np.arange(n_train) % 10).astype(np.uint8),
        "test": rng.permutation(np.arange(n_test) % 10).astype(np.uint8),
    }
    images = {name: synthetic_images(labels[name], rng) for name in ("train", "test")}
    return write_mnist(root, images, labels)


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory) -> FakeMnist:
    """~400 train and ~120 test learnable synthetic images as real IDX files (read-only use)."""
    return make_fake_mnist(tmp_path_factory.mktemp("fake_mnist"))


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """run_cli(*args) -> (exit code, stdout, stderr) of mnistsum_cli.cli.app.main(list(args))."""
    from mnistsum_cli.cli.app import main

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    for console in (terminal.console, terminal.error_console):
        # rich fixes a console's width from COLUMNS when it is made, at import: pytest-xdist's
        # workers import with COLUMNS=80. Let the width follow the environment the test sets.
        monkeypatch.setattr(console, "_width", None)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv(MNIST_DIR_ENV, raising=False)  # tests that want it set it themselves

    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()  # drop anything printed before this call
        try:
            main([str(arg) for arg in args])
        except SystemExit as exit_:
            code = exit_.code
        except BaseException as error:
            out, err = capsys.readouterr()
            pytest.fail(
                f"main({list(args)}) raised {type(error).__name__}: {error} instead of SystemExit\n"
                f"stdout:\n{out}\nstderr:\n{err}"
            )
        else:
            pytest.fail(f"main({list(args)}) returned instead of raising SystemExit")
        out, err = capsys.readouterr()
        if code is None:
            code = 0
        assert isinstance(code, int), f"exit code {code!r} is not an int"
        return code, _ANSI.sub("", out), _ANSI.sub("", err)

    return run


def assert_one_line_error(err: str, out: str = "") -> str:
    """stderr is exactly one line starting with 'error:' (after any 'note:' lines), and nothing
    looks like a traceback."""
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


@pytest.fixture
def ctrl_c_after_epoch(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """ctrl_c_after_epoch(): from now on, Ctrl-C right after the progress bar prints an epoch's
    line (as if pressed while the next epoch starts); ctrl_c_after_epoch(False): no more."""
    from mnistsum_cli.cli import report

    original = report.ProgressReporter.epoch_end

    def end_then_ctrl_c(self, record):
        original(self, record)
        raise KeyboardInterrupt

    def press(on: bool = True) -> None:
        monkeypatch.setattr(report.ProgressReporter, "epoch_end", end_then_ctrl_c if on else original)

    return press


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """chdir into a fresh tmp_path (commands default to ./data and ./artifacts); no MNIST env var."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(MNIST_DIR_ENV, raising=False)
    return tmp_path


# --------------------------------------------------------------------------- the real MNIST


def shared_mnist_path() -> Path:
    override = os.environ.get(TEST_MNIST_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "mnist"


@pytest.fixture(scope="session")
def shared_mnist() -> Path:
    """The real MNIST beside the repository (../shared/mnist, or $MNISTSUM_TEST_MNIST)."""
    root = shared_mnist_path()
    raw = root / "MNIST" / "raw"
    if not all((raw / name).is_file() for name in RAW_FILES):
        pytest.skip(f"real MNIST not found in {raw} (set ${TEST_MNIST_ENV})")
    return root


# --------------------------------------------------------------------------- a trained run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _main(*args: object) -> int:
    """main() outside capsys, for module-scoped fixtures."""
    from mnistsum_cli.cli.app import main

    try:
        main([str(arg) for arg in args])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    raise AssertionError("main() returned without SystemExit")


@pytest.fixture(scope="module")
def trained(fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding data/ and artifacts/ of one prepare + train + evaluate run (read-only)."""
    root = tmp_path_factory.mktemp("trained")
    data, artifacts = root / "data", root / "artifacts"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv(MNIST_DIR_ENV, raising=False)
        assert _main("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--data", data) == 0
        assert _main("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--data", data, "--artifacts", artifacts) == 0
        assert _main("evaluate", "--cpu", "--data", data, "--artifacts", artifacts) == 0
    return root


@pytest.fixture
def workdir(trained: Path, in_tmp: Path) -> Path:
    """A private copy of `trained`, and the current directory."""
    for name in ("data", "artifacts"):
        shutil.copytree(trained / name, in_tmp / name)
    return in_tmp


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes, but the store's lock and generation files (the last
    holder, the last commit's token)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (LOCK, GENERATION)
    }


def visible(folder: Path) -> list[str]:
    """The names in `folder` less the store's own files (lock, generation)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".mnistsum-"))


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders and unfinished journals anywhere under `folder`."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name.startswith(TEMP_PREFIX) or p.name == JOURNAL
    )


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the aten ops per training step that the simulated-CUDA tests counted."""
    from simulated_cuda import OPS_PER_STEP

    if OPS_PER_STEP:
        terminalreporter.section("aten ops per training step on simulated cuda:0 (about the kernel launches)")
        for arch, ops in OPS_PER_STEP.items():
            terminalreporter.write_line(f"{arch:>14}: {ops}")


# --------------------------------------------------------------------------- crashes


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> list[str]:
    """Make the `step`-th write, rename or replace of the store crash (a write crashes half done)."""
    import mnistsum_cli.store.transactions

    steps: list[str] = []
    real_write, real_rename, real_replace = mnistsum_cli.store.transactions.write_file, os.rename, os.replace

    def counted(kind, real):
        def call(*args, **kwargs):
            steps.append(kind)
            if len(steps) == step:
                if kind == "write":
                    real(args[0], args[1][: len(args[1]) // 2])
                raise Crash(kind)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(mnistsum_cli.store.transactions, "write_file", counted("write", real_write))
    monkeypatch.setattr(mnistsum_cli.store.transactions.os, "rename", counted("rename", real_rename))
    monkeypatch.setattr(mnistsum_cli.store.transactions.os, "replace", counted("replace", real_replace))
    monkeypatch.setattr(
        mnistsum_cli.store.transactions, "_remove_staged", lambda change: None
    )  # a killed writer cleans nothing
    return steps


def publish_model(run: RunDir, data: bytes) -> None:
    """Publish `data` as the run's model.safetensors, as train does (one commit of the folder)."""
    with commit(run.root) as change:
        change.write(run.model.name, data)


def save_model(path: Path, model, metadata: dict) -> None:
    """Write model.safetensors alone (a commit of its folder), as a test's stand-in for train."""
    from mnistsum_cli.training.checkpoint import model_bytes

    data = model_bytes(model, metadata)
    with commit(path.parent) as change:
        change.write(path, data)


def write_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """Replace one safetensors file of `tensors` and `metadata`, as a commit of its folder: a
    file of any kind the readers are tested on (training writes its own through checkpoint.py).
    The bytes are made first, so tensors safetensors refuses leave the folder as it was."""
    data = safetensors_bytes(tensors, metadata)
    with commit(path.parent) as change:
        change.write(path.name, data)


def model_metadata(arch: str, run_id: str = "r1", epoch: int = 1) -> dict:
    """What training records in model.safetensors (besides format and version)."""
    from mnistsum_cli.settings import TrainConfig

    return {
        "arch": arch,
        "run_id": run_id,
        "dataset_id": "abc",
        "config": TrainConfig().to_dict(),
        "epoch": epoch,
        "val_digit_accuracy": 0.5,
        "val_sum_accuracy": 0.25,
    }


@pytest.fixture
def global_flags():
    """Restore cuDNN autotuning and deterministic-algorithm flags after a test (train() sets them
    for the whole process)."""
    import torch

    saved = (
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.backends.cudnn.benchmark = saved[0]
    torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


def torchrun_command(processes: int, *args: object) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m mnistsum_cli ARGS`, with this Python."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return [*command, "-m", "mnistsum_cli", *(str(arg) for arg in args)]


def torchrun_env(**extra: str) -> dict[str, str]:
    """The environment for a torchrun of this checkout: no torchrun variables or MNIST folder
    inherited from the test's own process, the repository first on the path."""
    from mnistsum_cli.torchrun import TORCHRUN_VARIABLES

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (*TORCHRUN_VARIABLES, "MASTER_ADDR", "MASTER_PORT", MNIST_DIR_ENV)
    }
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def mnistsum_process(*args: object, **kwargs) -> subprocess.Popen:
    """`python -m mnistsum_cli ARGS` as a process of its own (this checkout's package, wide
    output, one OpenMP thread: the machine is small), its output captured as text."""
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "mnistsum_cli", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )
