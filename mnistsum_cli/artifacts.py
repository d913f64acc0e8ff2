"""Artifact paths, schemas, fingerprints and safe reads and writes.

Every file the pipeline produces goes through here: writes are atomic (temporary file in
the same folder, flush, fsync, rename), and reads turn any damage into a MnistsumError that
names the stage to rerun.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mnistsum_cli.errors import MnistsumError

SPLITS = ("train", "val", "test")
NUM_DIGITS = 10
NUM_SUMS = 19  # 0 + 0 .. 9 + 9

# Which MNIST set each split's image_index points into.
MNIST_SET_OF_SPLIT = {"train": "train", "val": "train", "test": "test"}

SPLIT_SCHEMA = pa.schema(
    [
        pa.field("image_index", pa.uint16(), nullable=False),
        pa.field("digit", pa.uint8(), nullable=False),
        pa.field("number", pa.uint8(), nullable=False),
        pa.field("sum", pa.uint8(), nullable=False),
    ]
)
METADATA_KEY = b"mnistsum"
SPLIT_META_KEYS = ("split", "dataset_id", "mnist_fingerprint", "mnist_root")
MODEL_FORMAT = "mnistsum-model/1"
CHECKPOINT_FORMAT = "mnistsum-checkpoint/1"


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class DataDir:
    """The folder `prepare` writes and `train`/`evaluate` read."""

    root: Path

    def split(self, name: str) -> Path:
        return self.root / f"{name}.parquet"


@dataclass(frozen=True)
class RunDir:
    """The folder `train` writes and `evaluate`/`plot` read."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.safetensors"

    @property
    def train_state(self) -> Path:
        return self.root / "train_state.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    def evaluation(self, split: str) -> Path:
        return self.root / f"evaluation_{split}.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def plots_manifest(self) -> Path:
        return self.plots / "manifest.json"


# --------------------------------------------------------------------------- small helpers


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """A short content hash of arrays (dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def fingerprint_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- atomic writes

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    On any error (Ctrl-C included) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and some writers) make 0600: use the usual mode
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: Path, stage: str) -> Any:
    """Read a JSON artifact; `stage` is the command that makes it, named in errors."""
    if not path.exists():
        raise MnistsumError(f"{path} not found: run `mnistsum {stage}` first")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MnistsumError(f"{path} is unreadable ({error}): rerun `mnistsum {stage}`") from None


# --------------------------------------------------------------------------- safetensors


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, Any]) -> None:
    """Save tensors with JSON-encoded metadata values (safetensors metadata is str → str)."""
    from safetensors.torch import save_file

    encoded = {key: json.dumps(value) for key, value in metadata.items()}
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=encoded))


def read_safetensors(
    path: Path, stage: str, expected_format: str, metadata_only: bool = False
) -> tuple[dict, dict[str, Any]]:
    """Load tensors (none when metadata_only) and decoded metadata, checking the file's kind."""
    from safetensors import safe_open

    if not path.exists():
        raise MnistsumError(f"{path} not found: run `mnistsum {stage}` first")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            tensors = {} if metadata_only else {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except Exception as error:  # safetensors raises several unrelated types on damage
        raise MnistsumError(
            f"{path} is not a valid safetensors file ({_first_line(error)}): rerun `mnistsum {stage}`"
        ) from None
    if metadata.get("format") != expected_format:
        raise MnistsumError(
            f"{path} is not a {expected_format} file: rerun `mnistsum {stage}`"
        )
    return tensors, metadata


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# --------------------------------------------------------------------------- parquet splits


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


def dataset_fingerprint(columns: dict[str, dict[str, np.ndarray]], mnist_fingerprint: str) -> str:
    """Identify a dataset by its rows and the MNIST files they point into."""
    arrays = [columns[split][name] for split in SPLITS for name in SPLIT_SCHEMA.names]
    return fingerprint_arrays(np.frombuffer(mnist_fingerprint.encode(), np.uint8), *arrays)


def write_split(path: Path, columns: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    table = pa.table(
        {name: pa.array(columns[name], type=SPLIT_SCHEMA.field(name).type) for name in SPLIT_SCHEMA.names},
        schema=SPLIT_SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta).encode()}),
    )
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def read_split(data: DataDir, name: str) -> Split:
    """Read and validate one split; any problem names `prepare` as the stage to rerun."""
    path = data.split(name)
    rerun = "rerun `mnistsum prepare`"
    if not path.exists():
        raise MnistsumError(f"{path} not found: run `mnistsum prepare` first")
    try:
        table = pq.read_table(path)
        columns_found = ", ".join(f"{field.name}: {field.type}" for field in table.schema)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, UnicodeDecodeError, ... on damage
        raise MnistsumError(f"{path} is not a valid Parquet file ({_first_line(error)}): {rerun}") from None
    if not table.schema.remove_metadata().equals(SPLIT_SCHEMA):
        raise MnistsumError(f"{path} has columns {columns_found}; expected {_schema_text()}: {rerun}")
    try:
        meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
        mnist_size = int(meta["mnist_sizes"][MNIST_SET_OF_SPLIT[name]])
        if not all(isinstance(meta.get(key), str) for key in SPLIT_META_KEYS):
            raise KeyError
    except (KeyError, TypeError, ValueError):
        raise MnistsumError(f"{path} lacks mnistsum metadata: {rerun}") from None
    if meta.get("split") != name:
        raise MnistsumError(f"{path} holds the {meta.get('split')!r} split, not {name!r}: {rerun}")
    if table.num_rows == 0:
        raise MnistsumError(f"{path} has no rows: {rerun}")
    if any(column.null_count for column in table.columns):
        raise MnistsumError(f"{path} has missing values: {rerun}")
    columns = {col: table.column(col).to_numpy() for col in SPLIT_SCHEMA.names}
    problems = [
        ("image_index", columns["image_index"] >= mnist_size, f"outside the MNIST {MNIST_SET_OF_SPLIT[name]} set"),
        ("digit", columns["digit"] > 9, "outside 0-9"),
        ("number", columns["number"] > 9, "outside 0-9"),
        ("sum", columns["sum"] != columns["digit"].astype(np.int16) + columns["number"], "!= digit + number"),
    ]
    for column, bad, what in problems:
        if bad.any():
            row = int(np.argmax(bad))
            raise MnistsumError(
                f"{path}: {int(bad.sum())} rows with {column} {what} (first: row {row}): {rerun}"
            )
    return Split(name=name, meta=meta, **columns)


def read_dataset(data: DataDir) -> Dataset:
    """Read all three splits and check they come from one `prepare` run."""
    splits = {name: read_split(data, name) for name in SPLITS}
    ids = {split.meta["dataset_id"] for split in splits.values()}
    if len(ids) != 1:
        raise MnistsumError(
            f"{data.root} mixes splits of different `prepare` runs: rerun `mnistsum prepare`"
        )
    return Dataset(splits=splits)


def _schema_text() -> str:
    return ", ".join(f"{field.name}: {field.type}" for field in SPLIT_SCHEMA)

