"""Safe artifact I/O: atomic writes, and reads that turn any damage into a MnistsumError."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import VAL_SIZE, FakeMnist
from mnistsum_cli.artifacts import (
    CHECKPOINT_FORMAT,
    METADATA_KEY,
    MODEL_FORMAT,
    SPLITS,
    DataDir,
    read_dataset,
    read_json,
    read_safetensors,
    read_split,
    write_atomic,
    write_json,
    write_safetensors,
)
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.mnist import load_mnist, resolve_source
from mnistsum_cli.prepare import PrepareOptions, prepare

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path: Path, error: BaseException) -> None:
    path = tmp_path / "thing.json"
    write_json(path, {"version": 1})
    before = path.read_bytes()

    def half_write(tmp: Path) -> None:
        tmp.write_text('{"version": 2, "trunc')
        raise error

    with pytest.raises(type(error)):
        write_atomic(path, half_write)
    assert path.read_bytes() == before
    assert json.loads(path.read_text()) == {"version": 1}
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing.json"]


def test_failed_first_write_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "new.bin"

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("no space left")

    with pytest.raises(OSError):
        write_atomic(path, fail)
    assert not path.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_successful_write_replaces_file(tmp_path: Path) -> None:
    path = tmp_path / "thing.bin"
    path.write_bytes(b"old")
    write_atomic(path, lambda tmp: tmp.write_bytes(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_safetensors_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": torch.arange(4.0)}, {"format": MODEL_FORMAT})
    before = path.read_bytes()

    def half_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00half a header")
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", half_save)
    with pytest.raises(type(error)):
        write_safetensors(path, {"w": torch.zeros(4)}, {"format": MODEL_FORMAT})
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    tensors, _ = read_safetensors(path, "train", MODEL_FORMAT)
    assert torch.equal(tensors["w"], torch.arange(4.0))


def test_shared_memory_tensors_fail_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    shared = torch.ones(4)
    with pytest.raises(Exception):
        write_safetensors(path, {"a": shared, "b": shared}, {"format": MODEL_FORMAT})
    assert not path.exists()
    assert _leftovers(tmp_path) == []


def test_read_json_errors_name_the_stage(tmp_path: Path) -> None:
    with pytest.raises(MnistsumError, match="mnistsum train"):
        read_json(tmp_path / "history.json", stage="train")
    (tmp_path / "bad.json").write_bytes(b"{\"a\": \xff")
    with pytest.raises(MnistsumError, match="mnistsum evaluate"):
        read_json(tmp_path / "bad.json", stage="evaluate")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # json's recursion limit
    with pytest.raises(MnistsumError, match="deep.json is unreadable .*mnistsum plot"):
        read_json(tmp_path / "deep.json", stage="plot")


# --------------------------------------------------------------------------- Parquet splits


@pytest.fixture(scope="module")
def prepared(fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory) -> DataDir:
    """One valid dataset (read-only: tests copy it before damaging it)."""
    data = DataDir(tmp_path_factory.mktemp("prepared") / "data")
    prepare(load_mnist(resolve_source(fake_mnist.root)), PrepareOptions(seed=0, val_size=VAL_SIZE), data)
    return data


@pytest.fixture
def data_copy(prepared: DataDir, tmp_path: Path) -> DataDir:
    shutil.copytree(prepared.root, tmp_path / "data")
    return DataDir(tmp_path / "data")


def _columns_and_meta(data: DataDir, split: str) -> tuple[dict[str, np.ndarray], dict]:
    table = pq.read_table(data.split(split))
    columns = {name: table.column(name).to_numpy().copy() for name in table.schema.names}
    return columns, json.loads(table.schema.metadata[METADATA_KEY])


def _write_raw(
    path: Path, columns: dict[str, np.ndarray], meta: dict | None, types: dict | None = None, nullable: bool = False
) -> None:
    """Write a Parquet file bypassing the package's writer (and its checks); columns are
    non-null, as prepare writes them, unless `nullable`."""
    types = {"image_index": pa.uint16(), "digit": pa.uint8(), "number": pa.uint8(), "sum": pa.uint8(), **(types or {})}
    schema = pa.schema([pa.field(name, types[name], nullable=nullable) for name in columns])
    table = pa.table({name: pa.array(values, type=types[name]) for name, values in columns.items()}, schema=schema)
    if meta is not None:
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path)


def test_valid_split_reads_back(prepared: DataDir) -> None:
    split = read_split(prepared, "train")
    assert len(split) == 400 - VAL_SIZE
    assert split.image_index.dtype == np.uint16
    np.testing.assert_array_equal(split.sum, split.digit + split.number)
    assert split.meta["split"] == "train"


def test_missing_split_names_prepare(tmp_path: Path) -> None:
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_split(DataDir(tmp_path), "train")
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_dataset(DataDir(tmp_path / "nowhere"))


def test_garbage_bytes(data_copy: DataDir) -> None:
    data_copy.split("val").write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_split(data_copy, "val")


def test_empty_file(data_copy: DataDir) -> None:
    data_copy.split("val").write_bytes(b"")
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_split(data_copy, "val")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_parquet(data_copy: DataDir, keep: float) -> None:
    path = data_copy.split("train")
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * keep)])
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_split(data_copy, "train")


def test_wrong_column_type(data_copy: DataDir) -> None:
    columns, meta = _columns_and_meta(data_copy, "train")
    _write_raw(data_copy.split("train"), columns, meta, types={"image_index": pa.int64()})
    with pytest.raises(MnistsumError, match="image_index"):
        read_split(data_copy, "train")


def test_missing_column(data_copy: DataDir) -> None:
    columns, meta = _columns_and_meta(data_copy, "train")
    del columns["number"]
    _write_raw(data_copy.split("train"), columns, meta)
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_split(data_copy, "train")


def test_extra_column(data_copy: DataDir) -> None:
    columns, meta = _columns_and_meta(data_copy, "test")
    columns["extra"] = columns["digit"].copy()
    _write_raw(data_copy.split("test"), columns, meta, types={"extra": pa.uint8()})
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_split(data_copy, "test")


def test_column_name_not_utf8(data_copy: DataDir) -> None:
    """One flipped byte in the footer's column name (found by the fuzz test below): the file
    still parses, but its schema names are not valid UTF-8."""
    path = data_copy.split("train")
    content = path.read_bytes()
    assert b"number" in content
    path.write_bytes(content.replace(b"number", b"numb\xdfr"))
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_split(data_copy, "train")


def test_nullable_columns_are_named_as_such(data_copy: DataDir) -> None:
    """Columns of the right types that allow nulls: the message must show what differs, not
    the same column list twice."""
    columns, meta = _columns_and_meta(data_copy, "train")
    _write_raw(data_copy.split("train"), columns, meta, nullable=True)
    with pytest.raises(MnistsumError) as error:
        read_split(data_copy, "train")
    found, expected = str(error.value).split(" has columns ")[1].split("; expected ")
    assert "image_index: uint16 (nullable)" in found
    assert "nullable" not in expected and expected.split(":")[0] == "image_index"


def test_a_folder_named_like_a_split(data_copy: DataDir) -> None:
    data_copy.split("val").unlink()
    data_copy.split("val").mkdir()
    with pytest.raises(MnistsumError, match=r"val.parquet is not a file .*mnistsum prepare") as error:
        read_split(data_copy, "val")
    assert "has columns" not in str(error.value)


def test_rows_changed_after_prepare_are_refused(data_copy: DataDir) -> None:
    """Rows edited in place (here an image_index that still fits the recorded MNIST sizes, raised
    to match) no longer hash to the dataset id every reader trusts, `status` included."""
    for split in SPLITS:
        columns, meta = _columns_and_meta(data_copy, split)
        meta["mnist_sizes"] = {"train": 500, "test": 500}
        if split == "train":
            columns["image_index"][-1] = 450  # past the 400 fake MNIST train images
        _write_raw(data_copy.split(split), columns, meta)
    read_split(data_copy, "train")  # each file on its own fits its metadata
    with pytest.raises(MnistsumError, match="dataset id.*mnistsum prepare"):
        read_dataset(data_copy)


def test_missing_metadata(data_copy: DataDir) -> None:
    columns, _ = _columns_and_meta(data_copy, "train")
    _write_raw(data_copy.split("train"), columns, None)
    with pytest.raises(MnistsumError, match="metadata"):
        read_split(data_copy, "train")


@pytest.mark.parametrize(
    "change",
    [
        lambda meta: meta.pop("dataset_id"),
        lambda meta: meta.pop("mnist_sizes"),
        lambda meta: meta.update(mnist_sizes="lots"),
        lambda meta: meta.update(dataset_id=5),
    ],
)
def test_incomplete_metadata(data_copy: DataDir, change) -> None:
    columns, meta = _columns_and_meta(data_copy, "train")
    change(meta)
    _write_raw(data_copy.split("train"), columns, meta)
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_split(data_copy, "train")


@pytest.mark.parametrize("content", [b"{not json", b"[" * 100_000 + b"]" * 100_000], ids=["not json", "too deep"])
def test_metadata_not_json(data_copy: DataDir, content: bytes) -> None:
    table = pq.read_table(data_copy.split("train")).replace_schema_metadata({METADATA_KEY: content})
    pq.write_table(table, data_copy.split("train"))
    with pytest.raises(MnistsumError, match="metadata"):
        read_split(data_copy, "train")


def test_split_file_of_another_split(data_copy: DataDir) -> None:
    shutil.copy(data_copy.split("val"), data_copy.split("test"))
    with pytest.raises(MnistsumError, match="val"):
        read_split(data_copy, "test")


def test_number_outside_0_9(data_copy: DataDir) -> None:
    columns, meta = _columns_and_meta(data_copy, "train")
    columns["number"][3] = 10
    columns["sum"][3] = columns["digit"][3] + 10  # keep sum = digit + number
    _write_raw(data_copy.split("train"), columns, meta)
    with pytest.raises(MnistsumError, match="number"):
        read_split(data_copy, "train")


def test_digit_outside_0_9(data_copy: DataDir) -> None:
    columns, meta = _columns_and_meta(data_copy, "val")
    columns["digit"][0] = 11
    columns["sum"][0] = 11 + columns["number"][0]
    _write_raw(data_copy.split("val"), columns, meta)
    with pytest.raises(MnistsumError, match="digit"):
        read_split(data_copy, "val")


def test_sum_not_digit_plus_number(data_copy: DataDir) -> None:
    columns, meta = _columns_and_meta(data_copy, "test")
    columns["sum"][-1] = (int(columns["sum"][-1]) + 1) % 19
    _write_raw(data_copy.split("test"), columns, meta)
    with pytest.raises(MnistsumError, match="sum"):
        read_split(data_copy, "test")


def test_sum_overflowing_uint8_is_caught(data_copy: DataDir) -> None:
    """digit 9 + number 247 wraps to 0 in uint8: the check must not be fooled by the wrap."""
    columns, meta = _columns_and_meta(data_copy, "test")
    columns["digit"][0], columns["number"][0], columns["sum"][0] = 9, 247, 0
    _write_raw(data_copy.split("test"), columns, meta)
    with pytest.raises(MnistsumError):
        read_split(data_copy, "test")


@pytest.mark.parametrize("split, size", [("train", 400), ("val", 400), ("test", 120)])
def test_image_index_outside_mnist_set(data_copy: DataDir, split: str, size: int) -> None:
    columns, meta = _columns_and_meta(data_copy, split)
    columns["image_index"][-1] = size  # one past the end of the MNIST set it points into
    _write_raw(data_copy.split(split), columns, meta)
    with pytest.raises(MnistsumError, match="image_index"):
        read_split(data_copy, split)


def test_no_rows(data_copy: DataDir) -> None:
    columns, meta = _columns_and_meta(data_copy, "val")
    _write_raw(data_copy.split("val"), {name: values[:0] for name, values in columns.items()}, meta)
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_split(data_copy, "val")


def test_dataset_from_two_prepare_runs_is_refused(fake_mnist: FakeMnist, prepared: DataDir, tmp_path: Path) -> None:
    other = DataDir(tmp_path / "other")
    prepare(load_mnist(resolve_source(fake_mnist.root)), PrepareOptions(seed=1, val_size=VAL_SIZE), other)
    mixed = DataDir(tmp_path / "mixed")
    shutil.copytree(prepared.root, mixed.root)
    shutil.copy(other.split("val"), mixed.split("val"))
    for name in SPLITS:  # every file on its own is fine
        read_split(mixed, name)
    with pytest.raises(MnistsumError, match="mnistsum prepare"):
        read_dataset(mixed)
    assert read_dataset(prepared).dataset_id != read_dataset(other).dataset_id


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


# --------------------------------------------------------------------------- fuzzing


def _read_split_bytes(content: bytes, split: str = "train") -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = DataDir(Path(folder))
        data.split(split).write_bytes(content)
        try:
            read_split(data, split)
        except MnistsumError:
            pass


def _read_safetensors_bytes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        path.write_bytes(content)
        try:
            read_safetensors(path, "train", MODEL_FORMAT)
        except MnistsumError:
            pass


def _mutate(content: bytes, cut: int, flips: list[int]) -> bytes:
    data = bytearray(content[: max(0, len(content) - cut)])
    for bit in flips:
        if data:
            position = bit % (8 * len(data))
            data[position // 8] ^= 1 << (position % 8)
    return bytes(data)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_read_split_random_bytes(content: bytes) -> None:
    _read_split_bytes(b"PAR1" + content + b"PAR1")
    _read_split_bytes(content)


@FUZZ
@given(cut=st.integers(0, 2000), flips=st.lists(st.integers(0, 10**7), max_size=6))
def test_fuzz_read_split_damaged_file(prepared: DataDir, cut: int, flips: list[int]) -> None:
    _read_split_bytes(_mutate(prepared.split("train").read_bytes(), cut, flips))


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
        path = Path(folder) / "valid.safetensors"
        write_safetensors(
            path,
            {"a.weight": torch.arange(24, dtype=torch.float32).reshape(4, 6), "a.count": torch.tensor(7)},
            {"format": MODEL_FORMAT, "arch": "fastnet-small", "epoch": 1},
        )
        content = path.read_bytes()
    _read_safetensors_bytes(_mutate(content, cut, flips))


def test_written_files_get_the_usual_mode(tmp_path: Path) -> None:
    """Temporary files are 0600; the renamed artifact must follow the umask like any file."""
    import os

    import torch

    from mnistsum_cli.artifacts import write_json, write_safetensors

    umask = os.umask(0)
    os.umask(umask)
    write_json(tmp_path / "a.json", {"x": 1})
    write_safetensors(tmp_path / "b.safetensors", {"w": torch.zeros(2)}, {"format": "x"})
    for name in ("a.json", "b.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
