"""The data a command works on, read once: the splits' header, MNIST's stamps, and an
up-to-date `run` that decides from metadata alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mnistsum_cli.data.splitdata
from conftest import VAL_SIZE, FakeMnist
from mnistsum_cli.data.mnist import load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.data.splitdata import SplitData, read_dataset_header
from mnistsum_cli.store.paths import DataDir
from mnistsum_cli.store.splits import read_dataset

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def own_mnist(fake_mnist: FakeMnist, tmp_path: Path) -> tuple[Path, DataDir]:
    """A private copy of the fake MNIST, and splits prepared from it."""
    root = tmp_path / "mnist"
    shutil.copytree(fake_mnist.root, root)
    folder = DataDir(tmp_path / "data")
    prepare(load_mnist(resolve_source(root)), PrepareOptions(val_size=VAL_SIZE), folder)
    return root, folder


def test_the_header_agrees_with_the_rows(own_mnist: tuple[Path, DataDir]) -> None:
    _, folder = own_mnist
    header, dataset = read_dataset_header(folder), read_dataset(folder)
    assert header.meta == dataset.meta and header.dataset_id == dataset.dataset_id
    assert header.rows == {name: len(split) for name, split in dataset.splits.items()}


def test_unchanged_mnist_is_told_from_its_stamps(
    own_mnist: tuple[Path, DataDir], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, folder = own_mnist

    def no_reading(source):
        raise AssertionError("MNIST was read")

    with monkeypatch.context() as patch:
        patch.setattr(mnistsum_cli.data.splitdata, "load_mnist", no_reading)
        assert SplitData(folder, root).mnist_unchanged()
    labels = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    os.utime(labels, ns=(0, 0))  # same bytes, other stamp: MNIST is read and its fingerprint compared
    assert SplitData(folder, root).mnist_unchanged()
    content = bytearray(labels.read_bytes())
    content[-1] = (content[-1] + 1) % 10
    labels.write_bytes(bytes(content))
    assert not SplitData(folder, root).mnist_unchanged()


def test_a_run_reads_the_splits_and_mnist_once(
    workdir: Path, fake_mnist: FakeMnist, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = {"splits": 0, "mnist": 0}

    def counted(name, function):
        def call(*args, **kwargs):
            reads[name] += 1
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(mnistsum_cli.data.splitdata, "read_dataset", counted("splits", read_dataset))
    monkeypatch.setattr(mnistsum_cli.data.splitdata, "load_mnist", counted("mnist", load_mnist))
    args = ("run", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--preset", "cpu", "--cpu", "--epochs", 2)
    code, out, err = run_cli(*args)  # train, evaluate and plot run
    assert code == 0, err
    assert reads == {"splits": 1, "mnist": 1}


def test_an_up_to_date_run_loads_neither_torch_nor_mnist(workdir: Path, fake_mnist: FakeMnist, run_cli) -> None:
    args = [
        "run",
        "--mnist-dir",
        str(fake_mnist.root),
        "--val-size",
        str(VAL_SIZE),
        "--preset",
        "cpu",
        "--cpu",
        "--epochs",
        "1",
    ]
    code, out, err = run_cli(*args)  # draws the plots: now every stage is up to date
    assert code == 0, err
    code = (
        "import sys\nfrom mnistsum_cli.cli.app import main\ntry:\n"
        f"    main({args!r})\nexcept SystemExit as exit_:\n    assert exit_.code in (0, None), exit_.code\n"
        "print('LOADED:', *[name for name in ('torch', 'torchvision', 'matplotlib') if name in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("up to date") == 4, result.stdout
    assert result.stdout.splitlines()[-1] == "LOADED:", result.stdout
