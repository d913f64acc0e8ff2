"""Changing one entry of a folder, never through a link: a file written whole and durably, a
file replaced outside any commit, an entry removed, a free name found; and the one wording of a
write that failed.

The commits of transactions.py are built from these; `replace_file` is for the one file no run
folder's commits manage (a `compare` figure).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Optional

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.diskfiles import entry_status, fault_text

TEMP_PREFIX = ".mnistsum-tmp."  # every temporary file or folder, removed by the next writer


class FolderNotWritable(MnistsumError):
    """folder_error's line; `error` is the OSError, for a caller that knows better what is on disk."""

    def __init__(self, message: str, error: OSError) -> None:
        super().__init__(message)
        self.error = error


def folder_error(folder: Path, error: OSError, after: str = "nothing was changed") -> FolderNotWritable:
    """One line for an OSError met while writing `folder`: the folder, the cause, what is on disk."""
    cause = error.strerror or str(error)
    return FolderNotWritable(f"cannot write {folder}/: {cause}; {after}", error)


def write_file(path: Path, data: bytes, folder_fd: Optional[int] = None) -> None:
    """Create `path` (it must not exist) with `data`, durably: written whole and fsynced. The
    mode is the usual one for new files (0666 less the umask). With `folder_fd`, `path` is a
    name in the folder open there."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666, dir_fd=folder_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(folder: Path) -> None:
    """Make the renames in `folder` durable (they are entries of the folder, not of the files)."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def json_bytes(data: Any) -> bytes:
    """A JSON file's bytes. Never NaN or infinity: JSON has neither (Python's `NaN` token is
    refused by other readers, and ours would pass it on), so a writer that can meet one refuses
    first or writes null; a ValueError here is a bug of that writer."""
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()


def replace_file(path: Path, data: bytes) -> None:
    """Write a file that no run folder's commits manage (a figure at `compare --out`, or in
    <artifacts>/compare/): whole or not at all, through a temporary file beside it and one
    rename. Its folder is created when missing and opened without following a link: a link
    planted as that folder (<artifacts>/compare a link to elsewhere) is refused, so the figure
    lands where the path says or nowhere. One line on failure, and nothing is written."""
    path = Path(path)
    folder = path.parent
    try:
        if not os.path.lexists(folder):
            folder.mkdir(parents=True, exist_ok=True)
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        found = entry_status(folder)
        if found is not None and stat.S_ISLNK(found.st_mode):
            raise MnistsumError(
                f"cannot write {path}: {folder} is a symbolic link, which mnistsum does not write through; "
                "nothing was written (give the folder it points to, or remove the link)"
            ) from None
        raise MnistsumError(f"cannot write {fault_text(path, error)}; nothing was written") from None
    temporary = f"{TEMP_PREFIX}{secrets.token_hex(6)}"
    try:
        write_file(Path(temporary), data, folder_fd)
        os.replace(temporary, path.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except OSError as error:
        raise MnistsumError(f"cannot write {fault_text(path, error)}; nothing was written") from None
    finally:
        try:
            os.unlink(temporary, dir_fd=folder_fd)
        except FileNotFoundError:
            pass
        os.close(folder_fd)


def remove_entry(path: Path) -> None:
    """Remove `path` itself: a real folder with all it holds (links in it are removed, not
    followed), anything else (a link included) by unlinking it. What cannot be removed stays
    (the next writer tries again)."""
    found = entry_status(path)
    try:
        if found is not None and stat.S_ISDIR(found.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        elif found is not None:
            os.unlink(path)
    except OSError:
        pass


def unused(path: Path, taken: frozenset[str] | set[str] = frozenset()) -> Path:
    """`path`, or path-2, path-3...: the first that no entry holds (a dangling link counts) and
    that is not in `taken`."""
    candidate, number = path, 2
    while entry_status(candidate) is not None or candidate.name in taken:
        candidate, number = path.with_name(f"{path.name}-{number}"), number + 1
    return candidate
