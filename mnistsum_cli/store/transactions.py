"""Changing a folder's set of files in one commit, all or nothing.

A writer holds the folder's lock (locks.py) and stages every new file under a temporary name,
written and fsynced; then a small journal naming the renames is put in place with one atomic
rename (journal.py), then the renames run (renames.py) and the journal goes. A kill, a full
disk or Ctrl-C therefore leaves the folder as it was before the journal appeared or, once it is
there, as it will be after: the next command that takes the lock finishes the renames and
removes every temporary file (recovery.py). Each commit also replaces the generation file, by
which readers tell that a commit overlapped their read (reads.py). What a folder holds is data,
never an instruction: the threat model in docs/reliability.md tells the whole story.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.interrupts import interrupts_deferred
from mnistsum_cli.store.journal import GENERATION, INSTALL, JOURNAL, MOVE, first_problem
from mnistsum_cli.store.locks import folder_lock
from mnistsum_cli.store.renames import StepFailed, apply
from mnistsum_cli.store.writes import TEMP_PREFIX, folder_error, fsync_folder, json_bytes, remove_entry, write_file


class Change:
    """The files one commit writes into a folder (staged under temporary names) and the runs it
    moves within it (into fresh names under previous/). Nothing shows until `commit()` ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.token = secrets.token_hex(4)
        self.operations: list[list[str]] = []
        self.journaled = False  # from then on the change is made: its staged files must stay
        self._count = 0

    def _temporary(self) -> Path:
        self._count += 1
        return self.folder / f"{TEMP_PREFIX}{self.token}.{self._count}"

    def _relative(self, path: Union[Path, str]) -> str:
        path = Path(path)
        return str(path.relative_to(self.folder) if path.is_relative_to(self.folder) else path)

    def write(self, path: Union[Path, str], data: bytes) -> None:
        """Stage `data` as the new content of `path` (a file of the folder)."""
        staged = self._temporary()
        write_file(staged, data)
        self.operations.append([INSTALL, staged.name, self._relative(path)])

    def write_json(self, path: Union[Path, str], data: Any) -> None:
        self.write(path, json_bytes(data))

    def folder_of(self, path: Union[Path, str]) -> Path:
        """An empty staged folder that replaces the folder `path` as a whole; fill it with write_file."""
        staged = self._temporary()
        staged.mkdir()
        self.operations.append([INSTALL, staged.name, self._relative(path)])
        return staged

    def move(self, source: Path, target: Path) -> None:
        """Move `source` to `target`, a name that must not exist yet (previous/<run id>/...)."""
        self.operations.append([MOVE, self._relative(source), self._relative(target)])


@contextmanager
def commit(folder: Path, command: str = "write", option: str = "folder") -> Iterator[Change]:
    """Stage a change in the block; when it ends normally, commit it in one step. On an error
    (Ctrl-C included) before the journal is in place nothing changes and the staged files go;
    once it is in place the change completes now or under the next writer. Takes the folder's
    lock for the block unless this process holds it already."""
    folder = Path(folder)
    with folder_lock(folder, command, option):
        change = Change(folder)
        try:
            yield change
            _commit(change)
        except OSError as error:
            raise folder_error(folder, error) from None
        finally:
            if not change.journaled:
                _remove_staged(change)


def _remove_staged(change: Change) -> None:
    """Remove what a change that failed before its journal staged."""
    for leftover in change.folder.glob(f"{TEMP_PREFIX}{change.token}.*"):
        remove_entry(leftover)


def _commit(change: Change) -> None:
    folder = change.folder
    generation = change._temporary()
    write_file(generation, change.token.encode())
    operations = change.operations + [[INSTALL, generation.name, GENERATION]]
    problem = first_problem(folder, operations)  # what the next writer would refuse is never journaled
    if problem is not None:
        raise MnistsumError(f"cannot write {folder}/ ({problem}); nothing was changed")
    staged_journal = change._temporary()
    write_file(staged_journal, json_bytes({"operations": operations}))
    with interrupts_deferred():
        os.replace(staged_journal, folder / JOURNAL)
        change.journaled = True
        fsync_folder(folder)  # the journal survives a power cut: from here the change is made
        try:
            apply(folder, operations)
            fsync_folder(folder)
        except (StepFailed, OSError) as error:
            cause = error.error if isinstance(error, StepFailed) else error
            raise folder_error(
                folder, cause, f"the change is recorded and the next mnistsum command that writes {folder}/ finishes it"
            ) from None
        (folder / JOURNAL).unlink()


def write_json(path: Path, data: Any) -> None:
    """Replace one JSON file, as a commit of its folder."""
    path = Path(path)
    with commit(path.parent) as change:
        change.write_json(path.name, data)
