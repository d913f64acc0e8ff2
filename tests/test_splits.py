"""The Parquet splits: reads that turn any damage into a MnistsumError naming `prepare`."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import FUZZ, VAL_SIZE, FakeMnist, mutate
from mnistsum_cli.data.mnist import load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.paths import SPLITS, DataDir
from mnistsum_cli.store.splits import METADATA_KEY, read_dataset, read_split

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

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


# --------------------------------------------------------------------------- fuzzing


def _read_split_bytes(content: bytes, split: str = "train") -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = DataDir(Path(folder))
        data.split(split).write_bytes(content)
        try:
            read_split(data, split)
        except MnistsumError:
            pass


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_read_split_random_bytes(content: bytes) -> None:
    _read_split_bytes(b"PAR1" + content + b"PAR1")
    _read_split_bytes(content)


@FUZZ
@given(cut=st.integers(0, 2000), flips=st.lists(st.integers(0, 10**7), max_size=6))
def test_fuzz_read_split_damaged_file(prepared: DataDir, cut: int, flips: list[int]) -> None:
    _read_split_bytes(mutate(prepared.split("train").read_bytes(), cut, flips))
