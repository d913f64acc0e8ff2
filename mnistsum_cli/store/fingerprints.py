"""What an artifact was made from, and when: content hashes of arrays and files, and time stamps.
Later stages compare them to tell an up-to-date artifact from a stale one."""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistsum_cli.store.diskfiles import read_file
from mnistsum_cli.store.paths import SPLIT_COLUMNS, SPLITS, RunDir
from mnistsum_cli.store.schemas import EVALUATION, HISTORY, MODEL_META
from mnistsum_cli.store.validation import Schema

if TYPE_CHECKING:  # numpy loads in the functions that use it: the CLI starts without it
    import numpy as np


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


def fingerprint_bytes(data: bytes) -> str:
    """A short content hash of a file's bytes (what evaluations and the plot manifest record)."""
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint_file(path: Path, kind: Schema) -> str:
    """fingerprint_bytes of the artifact `path`, read as a checked regular file no larger than
    its kind allows (diskfiles.read_file)."""
    return fingerprint_bytes(read_file(path, kind.max_bytes, kind.stage))


def plot_inputs(folder: RunDir) -> dict[str, Any]:
    """Fingerprints of what the plots are drawn from; plots/manifest.json keeps a copy."""
    return {
        "history": fingerprint_file(folder.history, HISTORY) if folder.history.exists() else None,
        "model": fingerprint_file(folder.model, MODEL_META) if folder.model.exists() else None,
        "evaluations": {
            split: fingerprint_file(folder.evaluation(split), EVALUATION)
            for split in SPLITS
            if folder.evaluation(split).exists()
        },
    }


def dataset_fingerprint(columns: dict[str, dict[str, np.ndarray]], mnist_fingerprint: str) -> str:
    """Identify a dataset by its rows and the MNIST files they point into."""
    import numpy as np

    arrays = [columns[split][name] for split in SPLITS for name in SPLIT_COLUMNS]
    return fingerprint_arrays(np.frombuffer(mnist_fingerprint.encode(), np.uint8), *arrays)
