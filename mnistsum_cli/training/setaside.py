"""Setting the run in an artifacts folder aside into previous/<run id>/ when a new run starts.

The move is part of the new run's first epoch commit (store.Change.move): until that epoch is
saved the previous run stays where it is, whole, and a kill, a full disk or Ctrl-C before then
leaves it untouched; after it, the previous run is whole in previous/<run id>/. There is never
a run to put back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.diskfiles import read_json
from mnistsum_cli.store.paths import RunDir, is_run_id, unknown_run_name
from mnistsum_cli.store.schemas import HISTORY, RUN_CONFIG, TRAIN_STATE
from mnistsum_cli.store.transactions import Change
from mnistsum_cli.store.writes import unused


def aside_folder(run: RunDir) -> Optional[Path]:
    """Where the run now in `run` will be kept (an unused previous/<run id>/), or None when
    there is nothing to keep."""
    if not any(path.exists() for path in run.run_files()):
        return None
    return unused(run.previous / _run_id_on_disk(run))


def set_aside(change: Change, run: RunDir, kept: Path) -> None:
    """Add to `change` the moves of every file of the run in `run` into `kept`."""
    for path in run.run_files():
        if path.exists():
            change.move(path, kept / path.name)


def _run_id_on_disk(run: RunDir) -> str:
    """The run id its JSON files record, or a time stamp when none is readable or usable as a
    folder name (this is where a run id becomes a path: paths.is_run_id says which can)."""
    for path, kind in ((run.train_state, TRAIN_STATE), (run.history, HISTORY), (run.config, RUN_CONFIG)):
        try:
            run_id = read_json(path, kind.stage, kind.max_bytes).get("run_id")
        except (MnistsumError, AttributeError):
            continue
        if is_run_id(run_id):
            return run_id
    return unknown_run_name()
