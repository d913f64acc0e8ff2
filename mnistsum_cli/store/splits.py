"""The Parquet splits `prepare` writes: their schema, writing them, and reading them back validated
(any problem names `prepare` as the stage to rerun)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistsum_cli.errors import MnistsumError, first_line
from mnistsum_cli.store.diskfiles import MAX_SPLIT_ROWS, read_file
from mnistsum_cli.store.fingerprints import dataset_fingerprint
from mnistsum_cli.store.paths import MNIST_SET_OF_SPLIT, SPLIT_COLUMNS, SPLITS, DataDir
from mnistsum_cli.store.reads import read_consistently
from mnistsum_cli.store.schemas import SPLIT_META

if TYPE_CHECKING:  # numpy and pyarrow load in the functions that use them: the CLI starts without them
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

METADATA_KEY = b"mnistsum"
RERUN = "rerun `mnistsum prepare`"  # how every problem with a split ends


@functools.cache
def split_schema() -> pa.Schema:
    """The Parquet schema of a split: uint16 image_index, uint8 digit, number and sum."""
    import pyarrow as pa

    types = {"image_index": pa.uint16(), "digit": pa.uint8(), "number": pa.uint8(), "sum": pa.uint8()}
    return pa.schema([pa.field(name, types[name], nullable=False) for name in SPLIT_COLUMNS])


@dataclass(frozen=True)
class Split:
    """One split's rows as numpy arrays, plus the metadata `prepare` recorded."""

    name: str
    image_index: np.ndarray
    digit: np.ndarray
    number: np.ndarray
    sum: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.image_index)


@dataclass(frozen=True)
class Dataset:
    """The three splits of one `prepare` run."""

    splits: dict[str, Split]

    @property
    def meta(self) -> dict[str, Any]:
        return self.splits["train"].meta

    @property
    def dataset_id(self) -> str:
        return self.meta["dataset_id"]


def split_bytes(columns: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """One split as a Parquet file in memory, with `prepare`'s metadata: a commit writes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = split_schema()
    table = pa.table(
        {name: pa.array(columns[name], type=schema.field(name).type) for name in SPLIT_COLUMNS},
        schema=schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()}),
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def open_split(data: DataDir, name: str) -> tuple[pq.ParquetFile, dict[str, Any]]:
    """One split's Parquet file, read once as a checked regular file (diskfiles.read_file) and
    opened in memory without decoding its rows; its columns, `prepare`'s metadata and the rows
    its footer declares checked (no more than the images of its MNIST set: a small file must not
    declare millions): where `read_split` and the up-to-date checks (splitdata.py) both start.
    The caller closes the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = data.split(name)
    content = read_file(path, SPLIT_META.max_bytes, "prepare")
    try:
        parquet = pq.ParquetFile(pa.BufferReader(content))
        schema = parquet.schema_arrow
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, UnicodeDecodeError, ... on damage
        raise MnistsumError(f"{path} is not a valid Parquet file ({first_line(error)}): {RERUN}") from None
    try:
        if not schema.remove_metadata().equals(split_schema()):
            raise MnistsumError(
                f"{path} has columns {_schema_text(schema) or 'none'}; expected {_schema_text(split_schema())}: {RERUN}"
            )
        meta = split_metadata(schema, path)
        if meta["split"] != name:
            raise MnistsumError(f"{path} holds the {meta['split']!r} split, not {name!r}: {RERUN}")
        images = min(meta["mnist_sizes"][MNIST_SET_OF_SPLIT[name]], MAX_SPLIT_ROWS)
        if parquet.metadata.num_rows > images:
            raise MnistsumError(
                f"{path} declares {parquet.metadata.num_rows:,} rows, more than the {images:,} images "
                f"its rows can take: {RERUN}"
            )
    except MnistsumError:
        parquet.close()
        raise
    return parquet, meta


def read_split(data: DataDir, name: str) -> Split:
    """Read and validate one split; any problem names `prepare` as the stage to rerun."""
    import numpy as np

    path = data.split(name)
    parquet, meta = open_split(data, name)
    with parquet:
        try:
            table = parquet.read()
        except Exception as error:  # damage past the footer: truncated or garbled row groups
            raise MnistsumError(f"{path} is not a valid Parquet file ({first_line(error)}): {RERUN}") from None
    mnist_size = meta["mnist_sizes"][MNIST_SET_OF_SPLIT[name]]
    if table.num_rows == 0:
        raise MnistsumError(f"{path} has no rows: {RERUN}")
    if any(column.null_count for column in table.columns):
        raise MnistsumError(f"{path} has missing values: {RERUN}")
    columns = {col: table.column(col).to_numpy() for col in SPLIT_COLUMNS}
    problems = [
        ("image_index", columns["image_index"] >= mnist_size, f"outside the MNIST {MNIST_SET_OF_SPLIT[name]} set"),
        ("digit", columns["digit"] > 9, "outside 0-9"),
        ("number", columns["number"] > 9, "outside 0-9"),
        ("sum", columns["sum"] != columns["digit"].astype(np.int16) + columns["number"], "!= digit + number"),
    ]
    for column, bad, what in problems:
        if bad.any():
            row = int(np.argmax(bad))
            raise MnistsumError(f"{path}: {int(bad.sum())} rows with {column} {what} (first: row {row}): {RERUN}")
    return Split(name=name, meta=meta, **columns)


def read_dataset(data: DataDir) -> Dataset:
    """Read all three splits and check they come from one `prepare` run (read between the data
    folder's commits: a `prepare` running meanwhile never mixes in)."""
    return read_consistently(data.root, lambda: _read_three(data))


def _read_three(data: DataDir) -> Dataset:
    splits = {name: read_split(data, name) for name in SPLITS}
    ids = {split.meta["dataset_id"] for split in splits.values()}
    if len(ids) != 1:
        raise MnistsumError(f"{data.root} mixes splits of different `prepare` runs: rerun `mnistsum prepare`")
    columns = {name: {col: getattr(split, col) for col in SPLIT_COLUMNS} for name, split in splits.items()}
    if dataset_fingerprint(columns, splits["train"].meta["mnist_fingerprint"]) != ids.pop():
        raise MnistsumError(
            f"{data.root}: the rows are not the ones `prepare` recorded (dataset id): rerun `mnistsum prepare`"
        )
    return Dataset(splits=splits)


def split_metadata(schema: pa.Schema, path: Path) -> dict[str, Any]:
    """`prepare`'s metadata in a split's Parquet schema, checked against its schema."""
    try:
        meta = json.loads((schema.metadata or {})[METADATA_KEY])
    except (KeyError, ValueError, RecursionError):
        raise MnistsumError(f"{path} lacks mnistsum metadata: {RERUN}") from None
    return SPLIT_META.check(meta, f"{path} metadata")


def _schema_text(schema: pa.Schema) -> str:
    """Columns as 'name: type', with nullability when a column allows nulls (the split's never do)."""
    return ", ".join(f"{field.name}: {field.type}{' (nullable)' if field.nullable else ''}" for field in schema)
