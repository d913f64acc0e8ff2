"""Artifact paths, schemas, fingerprints and safe reads and writes.

Every file the pipeline produces goes through here: writes are atomic (temporary file in
the same folder, flush, fsync, rename), and reads turn any damage into a MnistsumError that
names the stage to rerun.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from mnistsum_cli.errors import MnistsumError

if TYPE_CHECKING:  # numpy and pyarrow load in the functions that use them: the CLI starts without them
    import numpy as np
    import pyarrow as pa

SPLITS = ("train", "val", "test")
NUM_DIGITS = 10
NUM_SUMS = 19  # 0 + 0 .. 9 + 9

# Which MNIST set each split's image_index points into.
MNIST_SET_OF_SPLIT = {"train": "train", "val": "train", "test": "test"}

SPLIT_COLUMNS = ("image_index", "digit", "number", "sum")
DEFAULT_DATA = Path("data")  # where `prepare` writes and the later stages read, unless --data
DEFAULT_ARTIFACTS = Path("artifacts")  # where `train` writes and the later stages read, unless --artifacts


@functools.cache
def split_schema() -> pa.Schema:
    """The Parquet schema of a split: uint16 image_index, uint8 digit, number and sum."""
    import pyarrow as pa

    types = {"image_index": pa.uint16(), "digit": pa.uint8(), "number": pa.uint8(), "sum": pa.uint8()}
    return pa.schema([pa.field(name, types[name], nullable=False) for name in SPLIT_COLUMNS])


METADATA_KEY = b"mnistsum"
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

    @property
    def previous(self) -> Path:
        """Where earlier runs are kept when a new run starts: previous/<run_id>/."""
        return self.root / "previous"

    def run_files(self) -> list[Path]:
        """Everything one training run and the stages after it write here (present or not)."""
        trained = [self.model, self.checkpoint, self.train_state, self.history, self.config]
        return trained + [self.evaluation(split) for split in SPLITS] + [self.plots]


# --------------------------------------------------------------------------- small helpers


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """A short content hash of arrays (dtype, shape and bytes)."""
    import numpy as np

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


def plot_inputs(run: RunDir) -> dict[str, Any]:
    """Fingerprints of what the plots are drawn from; plots/manifest.json keeps a copy."""
    return {
        "history": fingerprint_file(run.history) if run.history.exists() else None,
        "model": fingerprint_file(run.model) if run.model.exists() else None,
        "evaluations": {split: fingerprint_file(run.evaluation(split)) for split in SPLITS if run.evaluation(split).exists()},
    }


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


@contextmanager
def sigint_recorded() -> Iterator[list[int]]:
    """While the block runs, Ctrl-C is noted in the yielded list instead of raised (only the
    main thread receives signals; elsewhere the list stays empty)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so that a set of files changes as a whole."""
    with sigint_recorded() as received:
        yield
    if received:
        raise KeyboardInterrupt


@contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; on success it replaces `folder` as a whole.

    On any error the temporary folder is removed and `folder` is untouched. The swap (two
    renames) holds Ctrl-C and puts the old folder back if the second rename fails.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield staging
        with interrupts_deferred():
            old = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.old"
            if folder.exists():
                os.rename(folder, old)
            try:
                os.rename(staging, folder)
            except BaseException:
                if old.exists():
                    os.rename(old, folder)
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def set_aside_run(run: RunDir) -> Optional[Path]:
    """Move the run in `run` (weights, checkpoint, history, evaluations, plots) to
    previous/<run_id>/ and return that folder, or None when there is nothing to keep.

    The files go into a temporary folder that is renamed to its final name only when all are
    in; Ctrl-C waits until the move is done, and a failed move puts the files back.
    """
    present = [path for path in run.run_files() if path.exists()]
    if not present:
        return None
    run.previous.mkdir(parents=True, exist_ok=True)
    target = _unused_folder(run.previous / _run_id_on_disk(run))
    staging = Path(tempfile.mkdtemp(prefix=".moving.", suffix=".tmp", dir=run.previous))
    with interrupts_deferred():
        try:
            _move_files(present, staging)
            try:
                os.rename(staging, target)
            except BaseException:
                _move_files([staging / path.name for path in present], run.root)
                raise
        finally:
            if staging.exists():
                staging.rmdir()
    return target


def restore_run(kept: Path, run: RunDir) -> None:
    """Move a run that set_aside_run kept in `kept` back into `run` (which holds no run files)."""
    with interrupts_deferred():
        _move_files(sorted(kept.iterdir()), run.root)
    kept.rmdir()


def _move_files(paths: list[Path], folder: Path) -> None:
    """Rename each path into `folder`; if one fails, the ones already moved go back."""
    moved: list[Path] = []
    try:
        for path in paths:
            os.rename(path, folder / path.name)
            moved.append(path)
    except BaseException:
        for path in moved:
            os.rename(folder / path.name, path)
        raise


def _run_id_on_disk(run: RunDir) -> str:
    """The run id its JSON files record, or a time stamp when none is readable."""
    for path in (run.train_state, run.history, run.config):
        try:
            run_id = json.loads(path.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if isinstance(run_id, str) and run_id.isalnum():
            return run_id
    return "unknown-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")


def _unused_folder(path: Path) -> Path:
    candidate, number = path, 2
    while candidate.exists():
        candidate, number = path.with_name(f"{path.name}-{number}"), number + 1
    return candidate


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # RecursionError: [[[[...
        raise MnistsumError(f"{path} is unreadable ({_first_line(error)}): rerun `mnistsum {stage}`") from None


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
    import numpy as np

    arrays = [columns[split][name] for split in SPLITS for name in SPLIT_COLUMNS]
    return fingerprint_arrays(np.frombuffer(mnist_fingerprint.encode(), np.uint8), *arrays)


def write_split(path: Path, columns: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = split_schema()
    table = pa.table(
        {name: pa.array(columns[name], type=schema.field(name).type) for name in SPLIT_COLUMNS},
        schema=schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()}),
    )
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def read_split(data: DataDir, name: str) -> Split:
    """Read and validate one split; any problem names `prepare` as the stage to rerun."""
    import numpy as np
    import pyarrow.parquet as pq

    path = data.split(name)
    rerun = "rerun `mnistsum prepare`"
    if not path.exists():
        raise MnistsumError(f"{path} not found: run `mnistsum prepare` first")
    if not path.is_file():
        raise MnistsumError(f"{path} is not a file (a folder or a device): {rerun}")
    try:
        table = pq.read_table(path)
        columns_found = _schema_text(table.schema)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, UnicodeDecodeError, ... on damage
        raise MnistsumError(f"{path} is not a valid Parquet file ({_first_line(error)}): {rerun}") from None
    if not table.schema.remove_metadata().equals(split_schema()):
        raise MnistsumError(f"{path} has columns {columns_found or 'none'}; expected {_schema_text(split_schema())}: {rerun}")
    try:
        meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
    except (KeyError, ValueError, RecursionError):
        raise MnistsumError(f"{path} lacks mnistsum metadata: {rerun}") from None
    from mnistsum_cli.schemas import SPLIT_META  # schemas reads artifacts' constants

    mnist_size = SPLIT_META.check(meta, f"{path} metadata")["mnist_sizes"][MNIST_SET_OF_SPLIT[name]]
    if meta.get("split") != name:
        raise MnistsumError(f"{path} holds the {meta.get('split')!r} split, not {name!r}: {rerun}")
    if table.num_rows == 0:
        raise MnistsumError(f"{path} has no rows: {rerun}")
    if any(column.null_count for column in table.columns):
        raise MnistsumError(f"{path} has missing values: {rerun}")
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
    columns = {name: {col: getattr(split, col) for col in SPLIT_COLUMNS} for name, split in splits.items()}
    if dataset_fingerprint(columns, splits["train"].meta["mnist_fingerprint"]) != ids.pop():
        raise MnistsumError(f"{data.root}: the rows are not the ones `prepare` recorded (dataset id): rerun `mnistsum prepare`")
    return Dataset(splits=splits)


def _schema_text(schema: pa.Schema) -> str:
    """Columns as 'name: type', with nullability when a column allows nulls (the split's never do)."""
    return ", ".join(f"{field.name}: {field.type}{' (nullable)' if field.nullable else ''}" for field in schema)

