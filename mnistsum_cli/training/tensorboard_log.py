"""Optional TensorBoard event files of a training run (`train --tensorboard`).

The same figures history.json holds: per-step train metrics and learning rate, per-epoch train
and val metrics (at the global step the epoch ends, so both line up), and, when the run
completes, its hyperparameters with the kept epoch's metrics. Events go to <dir>/<run id>/, so
`tensorboard --logdir <dir>` shows every run and `--resume` continues the same one. Written
when an epoch is saved (never for an epoch that is not on disk), by rank 0 only. Nothing of
tensorboard is imported unless asked for.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.paths import RunDir
from mnistsum_cli.store.schemas import HISTORY

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from mnistsum_cli.training.loop import Reporter

INSTALL = "pip install 'mnistsum[tensorboard]'"
FOLDER = "tensorboard"  # under the artifacts folder, unless --tensorboard-dir
STEP_KEYS = ("lr", "train_loss", "train_digit_loss", "train_sum_loss", "train_digit_accuracy", "train_sum_accuracy")
EPOCH_KEYS = tuple(
    f"{split}_{key}"
    for split in ("train", "val")
    for key in ("loss", "digit_loss", "sum_loss", "digit_accuracy", "sum_accuracy")
)
FINAL_KEYS = ("val_digit_accuracy", "val_sum_accuracy", "val_loss", "train_loss")


def check_installed() -> None:
    """Refuse --tensorboard before training starts when the package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise MnistsumError(f"--tensorboard needs the tensorboard package: {INSTALL}")


def default_log_root(folder: RunDir) -> Path:
    """<artifacts>/tensorboard, refused before training starts when it is a link (planted in a
    folder someone else prepared, it would take the event files elsewhere). A --tensorboard-dir
    is the user's own choice and is taken as given."""
    root = folder.root / FOLDER
    _refuse_link(root)
    return root


def _refuse_link(folder: Path) -> None:
    if folder.is_symlink():
        raise MnistsumError(
            f"{folder} is a symbolic link, which mnistsum does not write events through: remove it "
            "(or pass --tensorboard-dir)"
        )


@contextmanager
def tensorboard_events(inner: Reporter, folder: RunDir, log_root: Optional[Path]) -> Iterator[Reporter]:
    """`inner`, writing TensorBoard events under `log_root` too when it is given (files closed at the end)."""
    if log_root is None:
        yield inner
        return
    reporter = TensorBoardReporter(inner, folder, log_root)
    try:
        yield reporter
    finally:
        reporter.close()


class TensorBoardReporter:
    """A Reporter that writes each saved epoch's figures, then passes every call on to `inner`."""

    def __init__(self, inner: Reporter, folder: RunDir, log_root: Path) -> None:
        self.inner, self.folder, self.log_root = inner, folder, log_root
        self.writer: Optional[SummaryWriter] = None
        self.epochs = 0

    def epoch_start(self, epoch: int, epochs: int, steps: int, batch_size: int) -> None:
        self.epochs = epochs
        self.inner.epoch_start(epoch, epochs, steps, batch_size)

    def step(self) -> None:
        self.inner.step()

    def epoch_end(self, record: dict[str, Any]) -> None:
        history = HISTORY.read_json(self.folder.history)  # just saved: names the run, holds the kept epoch
        writer = self._writer(history["run_id"])
        for row in record["steps"]:
            for key in STEP_KEYS:
                writer.add_scalar(f"step/{key}", row[key], row["step"])
        end = record["steps"][-1]["step"]
        for key in EPOCH_KEYS:
            writer.add_scalar(f"epoch/{key}", record[key], end)
        writer.add_scalar("epoch/seconds", record["seconds"], end)
        if record["epoch"] == self.epochs:  # the run is complete: its settings and the kept epoch's figures
            kept = history["epochs"][history["best_epoch"] - 1]
            writer.add_hparams(history["config"], {f"final/{key}": kept[key] for key in FINAL_KEYS}, run_name=".")
        writer.flush()
        self.inner.epoch_end(record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _writer(self, run_id: str) -> SummaryWriter:
        """Events of run `run_id` go to <root>/<run id>/, so a resumed run continues its own."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _refuse_link(self.log_root / run_id)  # <root>/<run id> planted for the run --resume continues
            self.writer = SummaryWriter(log_dir=str(self.log_root / run_id))
        return self.writer
