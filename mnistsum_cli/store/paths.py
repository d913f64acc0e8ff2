"""Where each artifact lives: the data and artifacts folders, the file names in them, and the
constants that name splits, classes and file formats."""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
NUM_DIGITS = 10
NUM_SUMS = 19  # 0 + 0 .. 9 + 9
MNIST_IMAGES = 70_000  # train + test: no split, and no count of its rows, exceeds it

# Which MNIST set each split's image_index points into.
MNIST_SET_OF_SPLIT = {"train": "train", "val": "train", "test": "test"}

SPLIT_COLUMNS = ("image_index", "digit", "number", "sum")
DEFAULT_DATA = Path("data")  # where `prepare` writes and the later stages read, unless --data
DEFAULT_ARTIFACTS = Path("artifacts")  # where `train` writes and the later stages read, unless --artifacts
SWEEPS = "sweeps"  # <artifacts>/sweeps/<study>/: a study's trial-<n>/ run folders, plots and default storage
MODEL_FORMAT = "mnistsum-model/1"
CHECKPOINT_FORMAT = "mnistsum-checkpoint/1"
MAX_RUN_ID = 64  # training makes 16 hex digits; a longer id is not one of its own
# A run id names a folder (previous/<run id>/) and shows in tables: ASCII letters and digits, so
# no separator, dot, NUL or rich markup can reach a path or a screen through it. The one rule:
# is_run_id and the artifacts' schemas (schemas.RUN) both use it.
RUN_ID_PATTERN = f"[A-Za-z0-9]{{1,{MAX_RUN_ID}}}"
# previous/<name>/: a run id, or unknown-<time>, each maybe with -2, -3... (setaside.py names them)
KEPT_NAME = re.compile(rf"{RUN_ID_PATTERN}(-{RUN_ID_PATTERN}){{0,2}}")


def is_run_id(value: object) -> bool:
    """Whether `value` can name a kept run's folder previous/<run id>/ (RUN_ID_PATTERN)."""
    return isinstance(value, str) and re.fullmatch(RUN_ID_PATTERN, value) is not None


def unknown_run_name() -> str:
    """The folder name of a kept run whose id is unknown or unusable: a time stamp."""
    return "unknown-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")


# The decoders `predict` tries on an image file (PIL's names): what photos, scans and drawings come as.
IMAGE_FILE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")


def formats_text(formats: tuple[str, ...]) -> str:
    """PIL's format names as a user reads them: ("PNG", "JPEG", "WEBP") -> "PNG, JPEG or WebP"."""
    names = [{"WEBP": "WebP"}.get(name, name) for name in formats]
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1])))


ONNX_FORMAT = "mnistsum-onnx/1"


@dataclass(frozen=True)
class DataDir:
    """The folder `prepare` writes and `train`/`evaluate` read."""

    root: Path

    def split(self, name: str) -> Path:
        return self.root / f"{name}.parquet"

    def files(self) -> list[Path]:
        """Everything `prepare` writes here (journal.py lets a commit of a folder write only
        these and RunDir.run_files)."""
        return [self.split(name) for name in SPLITS]


@dataclass(frozen=True)
class RunDir:
    """The folder `train` writes and `evaluate`/`plot` read."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def onnx(self) -> Path:
        """`mnistsum export`: the kept model as one ONNX file, for onnxruntime (export.py)."""
        return self.root / "model.onnx"

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
    def setup_file(self) -> Path:
        return self.root / "config.json"

    def evaluation(self, split: str) -> Path:
        return self.root / f"evaluation_{split}.json"

    @property
    def trial(self) -> Path:
        """What `sweep` records about the trial this run is (trial-<n>/ of a study folder)."""
        return self.root / "trial.json"

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
        """Everything one training run and the stages after it write here (present or not): what
        a new run sets aside into previous/<run id>/, and, with DataDir.files, the only names a
        commit may write (journal.py checks every journal against them: add a new artifact here)."""
        trained = [self.model, self.checkpoint, self.train_state, self.history, self.setup_file]
        return trained + [self.evaluation(split) for split in SPLITS] + [self.plots, self.onnx, self.trial]
