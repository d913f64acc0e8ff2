"""Safetensors files: atomic writes, and reads that turn any damage into a MnistsumError."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import FUZZ, leftovers, mutate, write_safetensors
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.paths import CHECKPOINT_FORMAT, MODEL_FORMAT
from mnistsum_cli.store.tensorfiles import read_safetensors


@pytest.mark.parametrize(
    "error, raised",
    [(OSError(errno.ENOSPC, "No space left on device"), MnistsumError), (KeyboardInterrupt(), KeyboardInterrupt)],
)
def test_failed_safetensors_write_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, raised: type
) -> None:
    import mnistsum_cli.store.transactions

    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": torch.arange(4.0)}, {"format": MODEL_FORMAT})
    before = path.read_bytes()
    real_write = mnistsum_cli.store.transactions.write_file

    def half_write(target: Path, data: bytes) -> None:
        real_write(target, data[: len(data) // 2])
        raise error

    monkeypatch.setattr(mnistsum_cli.store.transactions, "write_file", half_write)
    with pytest.raises(raised):
        write_safetensors(path, {"w": torch.zeros(4)}, {"format": MODEL_FORMAT})
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    tensors, _ = read_safetensors(path, "train", MODEL_FORMAT)
    assert torch.equal(tensors["w"], torch.arange(4.0))


def test_shared_memory_tensors_fail_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    shared = torch.ones(4)
    with pytest.raises(Exception):  # noqa: B017 - which type safetensors raises is its own business
        write_safetensors(path, {"a": shared, "b": shared}, {"format": MODEL_FORMAT})
    assert not path.exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- safetensors


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    write_safetensors(
        path,
        {"layer.weight": torch.randn(8, 4), "layer.bias": torch.zeros(8), "count": torch.tensor(3)},
        {"format": MODEL_FORMAT, "arch": "fastnet-small", "epoch": 2, "config": {"lr": 0.004}},
    )
    return path


def test_safetensors_round_trip(model_file: Path) -> None:
    tensors, meta = read_safetensors(model_file, "train", MODEL_FORMAT)
    assert set(tensors) == {"layer.weight", "layer.bias", "count"}
    assert meta == {"format": MODEL_FORMAT, "arch": "fastnet-small", "epoch": 2, "config": {"lr": 0.004}}


def test_safetensors_missing(tmp_path: Path) -> None:
    with pytest.raises(MnistsumError, match="mnistsum train"):
        read_safetensors(tmp_path / "model.safetensors", "train", MODEL_FORMAT)


def test_safetensors_garbage(model_file: Path) -> None:
    model_file.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(MnistsumError, match="mnistsum train"):
        read_safetensors(model_file, "train", MODEL_FORMAT)


@pytest.mark.parametrize("keep", [0, 4, 8, 20, -1])
def test_safetensors_truncated(model_file: Path, keep: int) -> None:
    content = model_file.read_bytes()
    model_file.write_bytes(content[:keep] if keep >= 0 else content[:-5])
    with pytest.raises(MnistsumError, match="mnistsum train"):
        read_safetensors(model_file, "train", MODEL_FORMAT)


def test_safetensors_wrong_format(model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(MnistsumError, match=CHECKPOINT_FORMAT):
        read_safetensors(model_file, "train", CHECKPOINT_FORMAT)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))  # no metadata at all
    with pytest.raises(MnistsumError, match=MODEL_FORMAT):
        read_safetensors(plain, "train", MODEL_FORMAT)
    save_file({"w": torch.ones(2)}, str(plain), metadata={"format": "not json"})
    with pytest.raises(MnistsumError):
        read_safetensors(plain, "train", MODEL_FORMAT)


def _read_safetensors_bytes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        path.write_bytes(content)
        try:
            read_safetensors(path, "train", MODEL_FORMAT)
        except MnistsumError:
            pass


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_read_safetensors_random_bytes(content: bytes) -> None:
    _read_safetensors_bytes(content)
    header = b'{"__metadata__":{"format":"\\"mnistsum-model/1\\""}}'
    _read_safetensors_bytes(len(header).to_bytes(8, "little") + header + content)


@FUZZ
@given(cut=st.integers(0, 300), flips=st.lists(st.integers(0, 10**6), max_size=6))
def test_fuzz_read_safetensors_damaged_file(cut: int, flips: list[int]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        write_safetensors(
            path,
            {"a.weight": torch.arange(24, dtype=torch.float32).reshape(4, 6), "a.count": torch.tensor(7)},
            {"format": MODEL_FORMAT, "arch": "fastnet-small", "epoch": 1},
        )
        content = path.read_bytes()
    _read_safetensors_bytes(mutate(content, cut, flips))
