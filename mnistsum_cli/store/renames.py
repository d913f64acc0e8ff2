"""Running a journal's renames, each directly in its folder or through folders opened without
following a link, and setting aside whatever stands in a rename's way instead of destroying it.

A commit runs its journal at once; recovery runs a killed writer's journal again, so every
rename is skipped when it is already done. What is in the way and was not made by the change (a
folder where a file goes, a file where the plots folder goes, a planted file at a move's
target) is renamed to .mnistsum-blocked.<token>.<name> and said in a note: never removed.
"""

from __future__ import annotations

import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mnistsum_cli.store.diskfiles import entry_status
from mnistsum_cli.store.journal import INSTALL
from mnistsum_cli.store.writes import TEMP_PREFIX, remove_entry
from mnistsum_cli.terminal import notice

BLOCKED_PREFIX = ".mnistsum-blocked."  # what stood in the way of a rename, set aside (never removed)


class StepFailed(Exception):
    """A rename of a journal failed: which entry (1-based), and the OSError."""

    def __init__(self, index: int, entry: list[str], error: OSError) -> None:
        super().__init__(index, entry, error)
        self.index, self.entry, self.error = index, entry, error

    def describe(self) -> str:
        kind, source, target = self.entry
        cause = self.error.strerror or str(self.error)
        return f"entry {self.index}, {kind} {source} -> {target}: {cause}"


def apply(folder: Path, operations: list[list[str]]) -> None:
    """Run a journal's renames (checked by journal.first_problem); each one is skipped when
    already done, so running them again after a kill finishes the change. An install replaces
    its target (a folder target is first renamed to a temporary name); a move goes to a name
    that did not exist. A failed rename is StepFailed, naming its entry."""
    for index, entry in enumerate(operations, 1):
        kind, source, target = entry
        try:
            if kind == INSTALL:
                _install(folder, source, target)
            else:
                _move(folder, source, target, _installed_over(folder, source, operations[index:]))
        except OSError as error:
            raise StepFailed(index, entry, error) from None
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX) and name.endswith(".replaced"):
            remove_entry(folder / name)


def _install(folder: Path, source_name: str, target_name: str) -> None:
    """Rename the staged `source_name` onto `target_name`, both directly in `folder` (a rename
    replaces a link itself, never what it points to). What stands in the way and is not the
    same kind (a folder where a file goes, a file where the plots folder goes) is set aside,
    not destroyed."""
    source, target = folder / source_name, folder / target_name
    staged, present = entry_status(source), entry_status(target)
    if staged is None:
        return  # installed already
    if present is not None:
        folder_in, folder_out = stat.S_ISDIR(staged.st_mode), stat.S_ISDIR(present.st_mode)
        if folder_in and (folder_out or stat.S_ISLNK(present.st_mode)):
            os.rename(target, folder / f"{TEMP_PREFIX}{secrets.token_hex(4)}.replaced")  # the old plots go
        elif folder_in or folder_out:
            blocked = folder / f"{BLOCKED_PREFIX}{secrets.token_hex(4)}.{target_name}"
            os.rename(target, blocked)
            notice(f"{target} was in the way of the change (a {'folder' if folder_out else 'file'}): kept as {blocked}")
    os.replace(source, target)


def _installed_over(folder: Path, name: str, later: list[list[str]]) -> bool:
    """Whether one of the `later` entries installed onto `name` already (its staged file is
    gone): then what `name` holds is the new file, not the one an earlier move takes."""
    return any(
        kind == INSTALL and target == name and entry_status(folder / source) is None for kind, source, target in later
    )


def _move(folder: Path, source_name: str, target: str, installed_over: bool) -> None:
    """Rename `source_name` (directly in `folder`) to previous/<kept>/<name>, creating those two
    folders, each opened without following a link, so the rename cannot leave `folder`. When
    the target exists and `source_name` is still the file to move (`installed_over` is false),
    the target is not ours (planted): the source is set aside as .mnistsum-blocked.<token>.<name>
    rather than left for a later install to replace."""
    previous, kept, name = target.split("/")
    root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if entry_status(folder / source_name) is None:
            return  # moved already
        with _subfolder(root, previous) as previous_fd, _subfolder(previous_fd, kept) as kept_fd:
            try:
                os.stat(name, dir_fd=kept_fd, follow_symlinks=False)
            except FileNotFoundError:
                os.rename(source_name, name, src_dir_fd=root, dst_dir_fd=kept_fd)
                return
            if installed_over:
                return  # moved already, and the new file installed in its place
            blocked = f"{BLOCKED_PREFIX}{secrets.token_hex(4)}.{source_name}"
            os.rename(source_name, blocked, src_dir_fd=root, dst_dir_fd=root)
            notice(
                f"{folder / target} was there already, not from this change: {folder / source_name} is kept as {folder / blocked}"
            )
    finally:
        os.close(root)


@contextmanager
def _subfolder(parent: int, name: str) -> Iterator[int]:
    """The folder `name` in the folder open as `parent` (made when missing), opened without
    following a link: a link there fails (ELOOP/ENOTDIR) instead of leading elsewhere."""
    try:
        os.mkdir(name, 0o777, dir_fd=parent)
    except FileExistsError:
        pass
    descriptor = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        yield descriptor
    finally:
        os.close(descriptor)
