"""Setting the run in an artifacts folder aside into previous/<run id>/ when a new run starts,
and putting it back when the new run saves nothing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from mnistsum_cli.paths import RunDir
from mnistsum_cli.store import interrupts_deferred


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
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(run_id, str) and run_id.isalnum():
            return run_id
    return "unknown-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")


def _unused_folder(path: Path) -> Path:
    candidate, number = path, 2
    while candidate.exists():
        candidate, number = path.with_name(f"{path.name}-{number}"), number + 1
    return candidate
