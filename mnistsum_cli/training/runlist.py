"""The training runs an artifacts folder holds, one row each: the current run, every run kept in
previous/<run id>/ and every trial of a sweep (sweeps/<study>/trial-<n>/), each read as a run.Run
(no torch), for `mnistsum runs` and `mnistsum compare`. A folder that is not a readable run is
listed as such, never an error."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import stat
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.settings import TrainConfig, in_words
from mnistsum_cli.store.diskfiles import MAX_PLOT_BYTES, opened
from mnistsum_cli.store.fingerprints import fingerprint_file
from mnistsum_cli.store.paths import SWEEPS, RunDir
from mnistsum_cli.store.schemas import EVALUATION, MODEL_META, TRIAL
from mnistsum_cli.training.run import Run, evaluates

# The columns of every row after the run's settings (TrainConfig's fields), in table order.
FIGURES = (
    "device",
    "precision",
    "world_size",
    "train_seconds",
    "kept_epoch",
    "val_digit_accuracy",
    "val_sum_accuracy",
    "test_digit_accuracy",
    "test_sum_accuracy",
)
# A sweep trial's study, number, state and value (trial.json); None for other runs.
TRIAL_COLUMNS = ("study", "trial", "trial_state", "trial_value")
SETTING_NAMES = tuple(TrainConfig().to_dict())
# What `compare` labels runs by: the settings, with the precision config.json records in place
# of the amp switch (which asks for mixed precision, ignored on the CPU), and the device.
COMPARED_COLUMNS = (*(name for name in SETTING_NAMES if name != "amp"), "device", "precision")
CAPTION_WIDTH = 200  # characters of a line of compare's caption, about the width of the figure
COLUMNS = ("run_id", "started", "state", "epochs_done", *SETTING_NAMES, *FIGURES, *TRIAL_COLUMNS, "folder")
DEFAULT_SORT = "started"
MAX_COMPARE_NAME = 120  # characters of compare's default file name: far below the 255 bytes a file system allows
COMPARE_NAMED_RUNS = 4  # runs a longer default name still names, before the count and hash of all
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


@dataclass
class RunEntry:
    """One listed folder: its row (COLUMNS; None where unknown) and the run it holds, if readable."""

    folder: Path
    row: dict[str, Any]
    run: Optional[Run] = field(default=None, repr=False)

    @property
    def readable(self) -> bool:
        return self.run is not None


def run_folders(artifacts: Path) -> list[Path]:
    """The artifacts folder itself when it holds a run, then each folder in previous/, then each
    sweep trial's folder (by study, then trial number)."""
    current = [artifacts] if any(path.exists() for path in RunDir(artifacts).run_files()) else []
    previous = RunDir(artifacts).previous
    kept = (
        sorted(p for p in previous.iterdir() if _is_folder(p) and not p.name.startswith("."))
        if _is_folder(previous)
        else []
    )
    trials = sorted(artifacts.glob(f"{SWEEPS}/*/trial-*"), key=lambda p: (p.parent.name, _trial_number(p)))
    real = [p for p in trials if _is_folder(p) and _is_folder(p.parent) and _is_folder(p.parent.parent)]  # no link
    return current + kept + real


def _trial_number(folder: Path) -> int:
    suffix = folder.name[len("trial-") :]
    return int(suffix) if suffix.isdigit() else -1


def _is_folder(path: Path) -> bool:
    """Whether `path` is a real folder, not a link to one (a link in previous/ could lead anywhere)."""
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def _is_kept(folder: Path) -> bool:
    """Whether the folder a user named is a kept run, previous/<run id>/ (which no commit ever writes)."""
    return folder.absolute().parent.name == RunDir(Path()).previous.name


def read_run(folder: Path, kept_run: bool) -> RunEntry:
    """The row of the run in `folder`; a folder without a readable history.json gets a row that
    says why, with the rest left empty. A `kept_run`'s journal is refused, never run (see
    store.read_consistently)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row["folder"] = str(folder)
    if not RunDir(folder).history.exists():
        row["state"] = "not a run (no history.json)"
        return RunEntry(folder, row)
    try:
        run = Run.read(RunDir(folder), kept_run=kept_run)
    except MnistsumError as error:
        row["state"] = f"unreadable: {error}"
        return RunEntry(folder, row)
    kept = run.kept_record
    row.update(run.config.to_dict())
    row.update(
        run_id=run.run_id,
        epochs_done=run.epoch,
        state=run.state_text,
        world_size=run.world_size,
        train_seconds=round(sum(record.get("seconds", 0.0) for record in run.history), 1),
        kept_epoch=kept and kept["epoch"],
        val_digit_accuracy=kept and kept["val_digit_accuracy"],
        val_sum_accuracy=kept and kept["val_sum_accuracy"],
        started=run.setup.get("started_at"),
        device=run.setup.get("device"),
        precision=run.setup.get("precision"),
    )
    row.update(_test_figures(run))
    row.update(_trial_figures(run))
    return RunEntry(folder, row, run)


def _test_figures(run: Run) -> dict[str, Any]:
    """Test accuracies from evaluation_test.json when it evaluates this run's model (run.evaluates)."""
    path = run.folder.evaluation("test")
    if not path.exists() or not run.folder.model.exists():
        return {}
    try:
        evaluation = EVALUATION.read_json(path)
        model_sha256 = fingerprint_file(run.folder.model, MODEL_META)
    except MnistsumError:
        return {}
    if not evaluates(evaluation, model_sha256):
        return {}
    return {"test_digit_accuracy": evaluation["digit_accuracy"], "test_sum_accuracy": evaluation["sum_accuracy"]}


def _trial_figures(run: Run) -> dict[str, Any]:
    """The sweep trial this run is (trial.json), when the record describes this run."""
    if not run.folder.trial.exists():
        return {}
    try:
        record = TRIAL.read_json(run.folder.trial)
    except MnistsumError:
        return {}
    if record["run_id"] != run.run_id:
        return {}
    return {
        "study": record["study"],
        "trial": record["number"],
        "trial_state": record["state"],
        "trial_value": record["value"],
    }


def list_runs(artifacts: Path, sort: str = DEFAULT_SORT) -> list[RunEntry]:
    """Every run in `artifacts`, sorted by column `sort` (empty values last)."""
    if sort not in COLUMNS:
        raise BadOption(f"--sort {sort!r} is not a column; choose from {', '.join(COLUMNS)}")
    if not artifacts.is_dir():
        raise MnistsumError(f"{artifacts} not found: run `mnistsum train` first (or pass --artifacts)")
    entries = [read_run(folder, kept_run=_is_kept(folder)) for folder in run_folders(artifacts)]
    filled = sorted((e for e in entries if e.row[sort] is not None), key=lambda e: e.row[sort])
    return filled + [e for e in entries if e.row[sort] is None]


def differing_settings(entries: list[RunEntry]) -> tuple[list[str], dict[str, Any]]:
    """The settings that differ between the readable runs, and those equal for all (name → value)."""
    return differing([entry.row for entry in entries if entry.readable], SETTING_NAMES)


def differing(rows: list[dict[str, Any]], names: tuple[str, ...]) -> tuple[list[str], dict[str, Any]]:
    """The columns `names` whose values differ between `rows`, and those equal in all (name → value)."""
    differ = [name for name in names if len({json.dumps(row[name]) for row in rows}) > 1]
    same = {name: rows[0][name] for name in names if rows and name not in differ}
    return differ, same


def settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in settings.items())


def as_csv(entries: list[RunEntry]) -> str:
    """All columns, one line per run, for spreadsheets and pandas.read_csv."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(entry.row for entry in entries)
    return out.getvalue()


def find_run(artifacts: Path, name: str) -> RunEntry:
    """A run named by its folder or by (a unique prefix of) its run id among the runs in `artifacts`."""
    folder = Path(name)
    if folder.is_dir():
        entry = read_run(folder, kept_run=_is_kept(folder))
        if not entry.readable:
            raise MnistsumError(f"{folder} holds no readable run ({entry.row['state']})")
        return entry
    entries = (
        [e for e in (read_run(f, kept_run=_is_kept(f)) for f in run_folders(artifacts)) if e.readable]
        if artifacts.is_dir()
        else []
    )
    matches = [e for e in entries if e.row["run_id"].startswith(name)] if name else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise MnistsumError(
            f"{name!r} is neither a run folder nor a run id in {artifacts}: see `mnistsum runs --artifacts {artifacts}`"
        )
    raise MnistsumError(f"{name!r} matches {len(matches)} runs in {artifacts}: give more of the run id")


def compare_labels(entries: list[RunEntry]) -> tuple[list[str], str]:
    """A label per run, in words, from what differs between the runs (COMPARED_COLUMNS), the
    run id where nothing does or to tell apart runs with equal labels; and a caption, in words,
    of what all share."""
    rows = [entry.row for entry in entries]
    differ, same = differing(rows, COMPARED_COLUMNS)
    labels = [", ".join(column_in_words(name, row[name]) for name in differ) for row in rows]
    labels = [
        f"{label} (run {row['run_id'][:8]})"
        if label and labels.count(label) > 1
        else label or f"run {row['run_id'][:8]}"
        for label, row in zip(labels, rows)
    ]
    shared = " · ".join(part for part in (column_in_words(name, value) for name, value in same.items()) if part)
    return labels, "\n".join(textwrap.wrap(f"every run: {shared}", CAPTION_WIDTH)) if shared else ""


def column_in_words(name: str, value: Any) -> str:
    """A setting, or the device or precision config.json records, as the captions of `compare`
    and `plot` say it ('' where unknown)."""
    if value is None:
        return ""
    if name == "device":
        return f"on {value}"
    if name == "precision":
        return f"{value} precision"
    return in_words(name, value)


def compare_path(artifacts: Path, entries: list[RunEntry]) -> Path:
    """Where `compare` writes without --out: <artifacts>/compare/, beside (never inside) the
    current run's plots/, named by the runs' ids (their letters and digits: a run id is read from
    a file); past MAX_COMPARE_NAME characters, by the first few and a hash of all."""
    ids = ["".join(filter(str.isalnum, entry.row["run_id"][:8])) or "run" for entry in entries]
    name = "-".join(ids)
    if len(name) > MAX_COMPARE_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{'-'.join(ids[:COMPARE_NAMED_RUNS])}-and-{len(ids) - COMPARE_NAMED_RUNS}-more-{digest}"
    return artifacts / "compare" / f"{name}.png"


def compare_output(out: Optional[Path], artifacts: Path, entries: list[RunEntry]) -> Path:
    """The file `compare` writes, checked before anything is drawn: --out must be a .png in an
    existing folder, not in a run's plots/ (`mnistsum plot` alone writes there), and replace no
    file but a PNG. The default folder <artifacts>/compare/ is made by the write itself
    (store.replace_file), which refuses a link planted in its place."""
    if out is None:
        return compare_path(artifacts, entries)
    if out.suffix.lower() != ".png":
        raise BadOption(f"--out {out}: the figure is a PNG: give a file name ending in .png")
    in_plots = out.parent.name == "plots" and (out.parent / "manifest.json").exists()
    if in_plots or out.name.startswith(".mnistsum-"):
        raise BadOption(
            f"--out {out} is a file of a run folder, which `mnistsum plot` and `train` write: choose another"
        )
    if not out.parent.is_dir():
        raise MnistsumError(f"--out {out}: no such folder {out.parent}")
    if out.exists() or out.is_symlink():
        with opened(out, MAX_PLOT_BYTES, None) as handle:
            if handle.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                raise MnistsumError(f"--out {out} exists and is not a PNG: not replacing it; choose another name")
    return out
