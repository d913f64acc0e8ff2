"""A training run in a run folder, as one type (Run) for its whole life: begun (the run found in
the folder is set aside into previous/<run id>/ by the first epoch's commit), an epoch committed,
loaded to resume, and read back for `status`, `runs`, `compare`, `plot` and `serve`. Also the
rules every reader of a run shares: which evaluation belongs to the model, what config.json and
the model's metadata say.

It reads JSON and safetensors headers only: torch loads (training.checkpoint) when an epoch is
committed or resumed, so `status` and `runs` start without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.diskfiles import read_json
from mnistsum_cli.store.fingerprints import now_iso
from mnistsum_cli.store.interrupts import interrupts_deferred
from mnistsum_cli.store.paths import CHECKPOINT_FORMAT, MODEL_FORMAT, RunDir, is_run_id, unknown_run_name
from mnistsum_cli.store.reads import read_consistently
from mnistsum_cli.store.schemas import CHECKPOINT_META, HISTORY, MODEL_META, RUN_SETUP, TRAIN_STATE
from mnistsum_cli.store.tensorfiles import decode_safetensors, read_safetensors
from mnistsum_cli.store.transactions import Change, commit
from mnistsum_cli.store.writes import unused

if TYPE_CHECKING:  # torch loads only when an epoch is committed or resumed
    from mnistsum_cli.training.checkpoint import Learner

# What every file of a run records, so that a reader can tell they belong together.
COMMON_KEYS = ("run_id", "dataset_id", "config", "world_size", "backend")


@dataclass
class Run:
    """One training run in `folder`: what its files say, and while it trains what this process
    did. Run.load reads the small train_state.json (no epoch records); Run.read the whole
    history.json; the loop builds one with Run.begin or Run.resume and commits epochs to it."""

    folder: RunDir
    run_id: str
    config: TrainConfig
    dataset_id: str
    epoch: int = 0  # epochs saved
    best_epoch: int = 0  # the epoch model.safetensors holds
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)  # epoch records (Run.read, the loop)
    setup: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json: where and how it trains
    world_size: int = 1
    # This process's part, never saved:
    aside: Optional[Path] = None  # where the first commit moves the run found in the folder
    begun_at: int = 0  # epochs saved when this process began or resumed the run
    load_seconds: float = 0.0  # reading the splits and MNIST, moving them to the device
    train_seconds: float = 0.0  # the training loop: epochs, validation, commits

    @property
    def complete(self) -> bool:
        return self.epoch >= self.config.epochs

    @property
    def trained_now(self) -> int:
        """Epochs this process trained (after --resume, not the ones saved before it)."""
        return self.epoch - self.begun_at

    @property
    def kept_record(self) -> Optional[dict[str, Any]]:
        """The epoch record of the weights model.safetensors holds (None before any epoch, or where
        the records were not read)."""
        return self.history[self.best_epoch - 1] if self.best_epoch and len(self.history) >= self.best_epoch else None

    @property
    def state_text(self) -> str:
        """The state `runs` shows: complete, or where it stopped."""
        if self.complete:
            return "complete"
        return f"interrupted at epoch {self.epoch} of {self.config.epochs}"

    # ------------------------------------------------------------------ reading a saved run

    @classmethod
    def saved(cls, folder: RunDir) -> Optional[Run]:
        """Run.load, or None when there is no saved run or its train_state.json cannot be read."""
        if not folder.train_state.exists():
            return None
        try:
            return cls.load(folder)
        except MnistsumError:
            return None

    @classmethod
    def load(cls, folder: RunDir) -> Run:
        """The run saved in `folder` by its train_state.json (no epoch records: the small file
        `status` and `--resume` need); MnistsumError when it cannot be read."""
        train_state = TRAIN_STATE.read_json(folder.train_state)
        return cls(
            folder,
            run_id=train_state["run_id"],
            config=TrainConfig.from_dict(train_state["config"]),
            dataset_id=train_state["dataset_id"],
            epoch=train_state["epoch"],
            best_epoch=train_state["best_epoch"],
            world_size=train_state.get("world_size", 1),
        )

    @classmethod
    def read(cls, folder: RunDir, kept_run: bool = False) -> Run:
        """The run in `folder` with its epoch records (history.json) and setup (config.json), read
        between commits; MnistsumError when history.json cannot be read. A `kept_run`'s journal
        is refused, never run (store.read_consistently)."""

        def read() -> tuple[dict[str, Any], dict[str, Any]]:
            return HISTORY.read_json(folder.history), read_setup(folder)

        history, setup = read_consistently(folder.root, read, kept=kept_run)
        records = history["epochs"]
        return cls(
            folder,
            run_id=str(history["run_id"]),
            config=TrainConfig.from_dict(history["config"]),
            dataset_id=history["dataset_id"],
            epoch=len(records),
            best_epoch=int(history["best_epoch"]),
            history=records,
            setup=setup,
            world_size=history.get("world_size", 1),
        )

    # ------------------------------------------------------------------ training it

    @classmethod
    def begin(
        cls,
        folder: RunDir,
        config: TrainConfig,
        dataset_id: str,
        run_id: str,
        facts: dict[str, Any],
        aside: Optional[Path] = None,
    ) -> Run:
        """A new run, in memory until its first epoch is committed; that commit also moves the
        run now in `folder` to `aside` (aside_folder), so a new run never loses the previous one.
        `facts`: the device, precision, versions and processes config.json records."""
        run = cls(folder, run_id, config, dataset_id, aside=aside, world_size=int(facts.get("world_size", 1)))
        run.setup = run._setup(facts)
        return run

    @classmethod
    def resume(
        cls, folder: RunDir, learner: Learner, config: TrainConfig, dataset_id: str, facts: dict[str, Any]
    ) -> Run:
        """The run saved in `folder`, its last epoch restored into `learner`; refused in one line
        when its files disagree, or were made with other data or settings."""
        from mnistsum_cli.training.checkpoint import read_checkpoint, restore

        train_state = TRAIN_STATE.read_json(folder.train_state)
        tensors, meta = read_checkpoint(folder.checkpoint)
        history = HISTORY.read_json(folder.history)
        if not (train_state.get("run_id") == meta.get("run_id") == history.get("run_id")):
            raise MnistsumError(f"{folder.root} holds files of different training runs: start afresh without --resume")
        if train_state.get("epoch") != meta.get("epoch"):
            raise MnistsumError(
                f"{folder.checkpoint} and {folder.train_state} disagree on the epoch: start afresh without --resume"
            )
        if meta.get("dataset_id") != dataset_id:
            raise MnistsumError("the checkpoint was trained on another dataset: start afresh without --resume")
        saved = TrainConfig.from_dict(meta["config"])
        if saved != config:
            raise MnistsumError(
                f"--resume with other settings ({', '.join(saved.changes_to(config))}) than the checkpoint's"
            )
        restore(learner, tensors, meta, folder.checkpoint, config.arch)
        epoch = int(meta["epoch"])
        run = cls(
            folder,
            meta["run_id"],
            config,
            dataset_id,
            epoch=epoch,
            best_epoch=int(train_state["best_epoch"]),
            history=history["epochs"][:epoch],
            world_size=int(facts.get("world_size", 1)),
            begun_at=epoch,
        )
        run.setup = run._setup(facts)
        return run

    def _setup(self, facts: dict[str, Any]) -> dict[str, Any]:
        return {"run_id": self.run_id, "dataset_id": self.dataset_id, "config": self.config.to_dict(), **facts}

    def add_epoch(self, record: dict[str, Any]) -> bool:
        """Take the next epoch's record; whether it is the epoch to keep (selection_score: a later
        epoch wins ties)."""
        best = self.kept_record
        self.history.append(record)
        self.epoch += 1
        improved = best is None or selection_score(record) >= selection_score(best)
        if improved:
            self.best_epoch = self.epoch
        return improved

    def write_epoch(self, learner: Learner, improved: bool) -> None:
        """Commit the epoch just added: model (when it improved), checkpoint, history, train_state.json and
        config.json change in one step, all or none. The first commit of a new run also moves the
        previous run to `aside`, in that same step: until it is saved the previous run stays where
        it is, whole (a kill, a full disk or Ctrl-C leave it untouched); after it, it is whole in
        previous/<run id>/, so there is never a run to put back."""
        from mnistsum_cli.training.checkpoint import checkpoint_bytes, model_bytes

        common = {key: self.setup[key] for key in COMMON_KEYS}
        with interrupts_deferred(), commit(self.folder.root, "train", "--artifacts") as change:
            if self.aside is not None:
                set_aside(change, self.folder, self.aside)
            if improved:
                best = self.history[self.best_epoch - 1]
                kept = {key: best[key] for key in ("val_digit_accuracy", "val_sum_accuracy")}
                meta = {**common, "arch": self.config.arch, "epoch": self.best_epoch, **kept}
                change.write(self.folder.model, model_bytes(learner.model, meta))
            change.write(self.folder.checkpoint, checkpoint_bytes(learner, {**common, "epoch": self.epoch}))
            change.write_json(self.folder.history, {**common, "best_epoch": self.best_epoch, "epochs": self.history})
            progress = {"epoch": self.epoch, "best_epoch": self.best_epoch, "updated_at": now_iso()}
            change.write_json(self.folder.train_state, {**common, **progress})
            change.write_json(self.folder.setup_file, self.setup)
        self.aside = None  # moved: later commits leave previous/ alone


def evaluates(evaluation: Any, model_sha256: Optional[str]) -> bool:
    """Whether an evaluation file's contents belong to the model whose fingerprint is
    `model_sha256` (fingerprints.fingerprint_file of model.safetensors): the one rule `status`,
    `runs`, `plot` and `serve` share. A file is read as it is: anything malformed belongs to none."""
    model = evaluation.get("model") if isinstance(evaluation, dict) else None
    return model_sha256 is not None and isinstance(model, dict) and model.get("sha256") == model_sha256


def epoch_count(epochs: int) -> str:
    """'1 epoch', '3 epochs': how every message counts a run's epochs."""
    return f"{epochs} epoch{'' if epochs == 1 else 's'}"


def selection_score(record: dict[str, Any]) -> tuple[float, float]:
    """Which epoch is kept: highest val sum accuracy, then val digit accuracy (later wins ties)."""
    return (record["val_sum_accuracy"], record["val_digit_accuracy"])


def read_setup(folder: RunDir) -> dict[str, Any]:
    """config.json: where and how the run trained (device, precision, versions, start), or {} when
    it is missing or unreadable (runs older than it have none; it only adds to what is shown)."""
    try:
        return RUN_SETUP.read_json(folder.setup_file)
    except MnistsumError:
        return {}


def model_meta(folder: RunDir, data: Optional[bytes] = None) -> dict[str, Any]:
    """model.safetensors' metadata, checked, without torch (the header alone): read from the
    file, or from `data`, the file's bytes the caller read once (serve: the bytes it serves)."""
    if data is None:
        _, meta = read_safetensors(folder.model, stage="train", expected_format=MODEL_FORMAT, metadata_only=True)
    else:
        _, meta = decode_safetensors(data, folder.model, "train", MODEL_FORMAT, metadata_only=True)
    return MODEL_META.check(meta, folder.model)


def resume_settings(folder: RunDir) -> Optional[TrainConfig]:
    """The settings `--resume` continues with (the checkpoint's), or None when there is no checkpoint."""
    if not folder.checkpoint.exists():
        return None
    _, meta = read_safetensors(folder.checkpoint, stage="train", expected_format=CHECKPOINT_FORMAT, metadata_only=True)
    return TrainConfig.from_dict(CHECKPOINT_META.check(meta, folder.checkpoint)["config"])


def aside_folder(folder: RunDir) -> Optional[Path]:
    """Where a new run's first commit will keep the run now in `folder` (an unused
    previous/<run id>/), or None when there is nothing to keep."""
    if not any(path.exists() for path in folder.run_files()):
        return None
    return unused(folder.previous / _run_id_on_disk(folder))


def set_aside(change: Change, folder: RunDir, kept: Path) -> None:
    """Add to `change` the moves of every file of the run in `folder` into `kept`."""
    for path in folder.run_files():
        if path.exists():
            change.move(path, kept / path.name)


def _run_id_on_disk(folder: RunDir) -> str:
    """The run id its JSON files record, or a time stamp when none is readable or usable as a
    folder name (this is where a run id becomes a path: paths.is_run_id says which can)."""
    for path, kind in ((folder.train_state, TRAIN_STATE), (folder.history, HISTORY), (folder.setup_file, RUN_SETUP)):
        try:
            run_id = read_json(path, kind.stage, kind.max_bytes).get("run_id")
        except (MnistsumError, AttributeError):
            continue
        if is_run_id(run_id):
            return run_id
    return unknown_run_name()
