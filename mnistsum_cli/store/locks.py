"""One writer per folder: a lock file (flock, released by the OS when its holder dies) that
records the holder's pid and command, so a second writer is refused at once, naming the first.

Taking the lock is also when a killed writer's work is finished (recovery.recover). A folder a
refused command created is removed again, so a refusal leaves nothing. The lock file is opened
by diskfiles' one checked open and is only ever a regular file with no other name: the holder's
pid is written into it, so a link to a file elsewhere would have that file overwritten.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.diskfiles import HARD_LINKED, SYMLINK, Unfit, entry_status, open_regular
from mnistsum_cli.store.recovery import recover
from mnistsum_cli.store.writes import folder_error

LOCK = ".mnistsum-lock"

_held: dict[tuple[int, int], int] = {}  # folders this process holds the lock of (_identity) -> the lock's descriptor


class FolderInUse(MnistsumError):
    """Another live process holds the folder's lock."""


def _identity(folder: Path) -> tuple[int, int]:
    """Which folder `folder` is, however it is reached (a link to it, another spelling)."""
    found = os.stat(folder)
    return found.st_dev, found.st_ino


def held_here(folder: Path) -> bool:
    """Whether this process holds `folder`'s lock (an OSError when the folder is gone)."""
    return _identity(folder) in _held


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; the ones this call created, outermost first."""
    missing = []
    for path in [folder, *folder.parents]:
        if os.path.lexists(path):
            break
        missing.append(path)
    made: list[Path] = []
    try:
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:  # another process made it first: it is not ours to remove
                continue
            made.append(path)
    except OSError:
        _remove_made(folder, made)
        raise
    return made


def _remove_made(folder: Path, made: list[Path]) -> None:
    """Remove the folders a failed command created, as long as they hold nothing but the lock:
    a refused command leaves nothing behind. A folder another process has started to use
    (its own lock file, a file) is not empty, and stays."""
    try:
        if made and os.listdir(folder) == [LOCK]:
            os.unlink(folder / LOCK)
        for path in reversed(made):
            os.rmdir(path)
    except OSError:
        pass


def _open_lock(folder: Path, flags: int) -> int:
    """The lock file's descriptor (diskfiles.open_regular, `one_name`): never through a link,
    and only a regular file with no other name."""
    path = folder / LOCK
    try:
        return open_regular(path, None, flags, one_name=True)
    except Unfit as unfit:
        what = {
            SYMLINK: "a symbolic link, which mnistsum never makes",
            HARD_LINKED: "a hard link to another file",
        }.get(unfit.reason, unfit.kind)
        raise MnistsumError(f"{path} is {what}: nothing was changed; remove it to use {folder}/") from None


@contextmanager
def folder_lock(folder: Path, command: str, option: str, create: bool = True) -> Iterator[None]:
    """Hold `folder`'s writer lock for the block, creating the folder when needed (a folder that
    does not exist is not created, nor locked, unless `create`; one this call created is removed
    again when the block fails before writing anything into it); finish or undo what a killed
    writer left first. Re-entrant within a process (`run` holds the locks its stages take
    again), whichever path reaches the folder. `option` is the flag that picks another folder,
    for the message."""
    folder = Path(folder)
    if not (create or folder.is_dir()):
        yield
        return
    for _ in range(100):  # again only when a failing command removed the folder it had made
        try:
            made = _make_folder(folder) if create else []
            key = _identity(folder)
        except OSError as error:
            raise folder_error(folder, error) from None
        if key in _held:
            yield
            return
        try:
            descriptor = _locked(folder, option)
        except BaseException:
            _remove_made(folder, made)
            raise
        if descriptor is not None:
            break
    else:
        raise MnistsumError(f"{folder}/ keeps disappearing while it is locked; nothing was changed")
    _held[key] = descriptor
    try:
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()} {command}\n".encode(), 0)
        except OSError as error:
            raise folder_error(folder, error) from None
        recover(folder)
        yield
    except BaseException:
        _remove_made(folder, made)  # still under the lock: no other writer is in the folder
        raise
    finally:
        del _held[key]
        os.close(descriptor)  # releases the flock


def _locked(folder: Path, option: str) -> Optional[int]:
    """Take the lock of `folder` (or say who holds it): the descriptor of the locked file, or
    None when the lock file was removed between our open and our flock (a command that made the
    folder and failed removes both): that locks nothing."""
    try:
        descriptor = _open_lock(folder, os.O_RDWR | os.O_CREAT)
    except OSError as error:
        raise folder_error(folder, error) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(descriptor, 200, 0).decode(errors="replace").split(None, 1)
        os.close(descriptor)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise folder_error(folder, error) from None
        pid = holder[0] if holder else "?"
        held_by = holder[1].strip() if len(holder) > 1 else "another command"
        raise FolderInUse(
            f"{folder}/ is in use by mnistsum {held_by} (pid {pid}); wait for it or use another {option}"
        ) from None
    on_disk, opened = entry_status(folder / LOCK), os.fstat(descriptor)
    if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino):
        return descriptor
    os.close(descriptor)
    return None


def locked_elsewhere(folder: Path) -> bool:
    """Whether a live process holds `folder`'s lock (without taking it)."""
    try:
        descriptor = _open_lock(folder, os.O_RDONLY)
    except (OSError, MnistsumError):
        return False  # no lock file, or one no writer can hold: folder_lock says which
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(descriptor)
