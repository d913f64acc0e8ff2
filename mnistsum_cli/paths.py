"""Where each artifact lives: the data and artifacts folders, the file names in them, and the
constants that name splits, classes and file formats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
NUM_DIGITS = 10
NUM_SUMS = 19  # 0 + 0 .. 9 + 9

# Which MNIST set each split's image_index points into.
MNIST_SET_OF_SPLIT = {"train": "train", "val": "train", "test": "test"}

SPLIT_COLUMNS = ("image_index", "digit", "number", "sum")
DEFAULT_DATA = Path("data")  # where `prepare` writes and the later stages read, unless --data
DEFAULT_ARTIFACTS = Path("artifacts")  # where `train` writes and the later stages read, unless --artifacts
SWEEPS = "sweeps"  # <artifacts>/sweeps/<study>/: a study's trial-<n>/ run folders, plots and default storage
MODEL_FORMAT = "mnistsum-model/1"
CHECKPOINT_FORMAT = "mnistsum-checkpoint/1"


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
        """Everything one training run and the stages after it write here (present or not)."""
        trained = [self.model, self.checkpoint, self.train_state, self.history, self.config]
        return trained + [self.evaluation(split) for split in SPLITS] + [self.plots]
