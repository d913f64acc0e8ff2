"""Changing an artifacts or data folder safely.

A folder has one writer at a time: a lock file (flock, released by the OS when its holder dies)
that records the holder's pid and command. A writer changes the folder's set of files in one
commit: every new file is first written and fsynced under a temporary name, then a small
journal naming the renames is put in place with one atomic rename, then the renames run and
the journal goes. A kill, a full disk or Ctrl-C therefore leaves the folder as it was before
the journal appeared or, once it is there, as it will be after: the next command that takes
the lock finishes the renames and removes every temporary file. Readers never wait for a
writer's long run: they read between commits and retry when a commit overlapped (a seqlock on a
generation file each commit replaces). docs/reliability.md tells the whole story.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

from mnistsum_cli.diskfiles import MAX_SMALL_JSON_BYTES, Missing, fault_text, read_file
from mnistsum_cli.errors import MnistsumError, first_line

LOCK = ".mnistsum-lock"
JOURNAL = ".mnistsum-journal.json"
GENERATION = ".mnistsum-generation"
MAX_GENERATION_BYTES = 1024  # the generation file holds one commit's token (8 hex digits)
TEMP_PREFIX = ".mnistsum-tmp."  # every temporary file or folder, removed by the next writer
READ_WAIT_SECONDS = 10.0  # how long a reader waits for a commit in progress (commits take milliseconds)
INSTALL, MOVE = "install", "move"

Result = TypeVar("Result")

_held: dict[Path, int] = {}  # folders this process holds the lock of -> the lock file's descriptor


class FolderInUse(MnistsumError):
    """Another live process holds the folder's lock."""


# --------------------------------------------------------------------------- errors


def folder_error(folder: Path, error: OSError, after: str = "nothing was changed") -> MnistsumError:
    """One line for an OSError met while writing `folder`: the folder, the cause, what is on disk."""
    cause = error.strerror or str(error)
    return MnistsumError(f"cannot write {folder}/: {cause}; {after}")


# --------------------------------------------------------------------------- the lock


@contextmanager
def folder_lock(folder: Path, command: str, option: str, create: bool = True) -> Iterator[None]:
    """Hold `folder`'s writer lock for the block, creating the folder when needed (a folder that
    does not exist is not created, nor locked, unless `create`); finish or undo what a killed
    writer left first. Re-entrant within a process (`run` holds the locks its stages take
    again). `option` is the flag that picks another folder, for the message."""
    folder = Path(folder)
    key = Path(os.path.abspath(folder))
    if key in _held or not (create or folder.is_dir()):
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
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
    _held[key] = descriptor
    try:
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()} {command}\n".encode(), 0)
            recover(folder)
        except OSError as error:
            raise folder_error(folder, error) from None
        yield
    finally:
        del _held[key]
        os.close(descriptor)  # releases the flock


def _locked_elsewhere(folder: Path) -> bool:
    """Whether a live process holds `folder`'s lock (without taking it)."""
    try:
        descriptor = os.open(folder / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(descriptor)


def recover(folder: Path) -> None:
    """Under the lock: finish the commit a killed writer left (its journal), then remove every
    temporary file and folder."""
    journal = folder / JOURNAL
    if journal.exists():
        try:
            operations = json.loads(journal.read_text())["operations"]
        except (ValueError, KeyError, TypeError):
            operations = []  # cannot happen (the journal is renamed in whole); nothing to finish
        _apply(folder, operations)
        _fsync_folder(folder)
        journal.unlink()
    for leftover in folder.glob(TEMP_PREFIX + "*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


# --------------------------------------------------------------------------- commits


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
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _commit(change: Change) -> None:
    folder = change.folder
    generation = change._temporary()
    write_file(generation, change.token.encode())
    operations = change.operations + [[INSTALL, generation.name, GENERATION]]
    staged_journal = change._temporary()
    write_file(staged_journal, json_bytes({"operations": operations}))
    with interrupts_deferred():
        os.replace(staged_journal, folder / JOURNAL)
        change.journaled = True
        _fsync_folder(folder)  # the journal survives a power cut: from here the change is made
        try:
            _apply(folder, operations)
            _fsync_folder(folder)
        except OSError as error:
            raise folder_error(
                folder, error, f"the change is recorded and the next mnistsum command that writes {folder}/ finishes it"
            ) from None
        (folder / JOURNAL).unlink()


def _apply(folder: Path, operations: list[list[str]]) -> None:
    """Run a journal's renames; each one is skipped when already done, so running them again
    after a kill finishes the change. An install replaces its target (a folder target is first
    renamed to a temporary name); a move goes to a name that did not exist."""
    for kind, source_name, target_name in operations:
        source, target = folder / source_name, folder / target_name
        if not source.exists() or (kind == MOVE and target.exists()):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == INSTALL and source.is_dir() and target.exists():
            os.rename(target, folder / f"{TEMP_PREFIX}{secrets.token_hex(4)}.replaced")
        os.replace(source, target)
    for old in folder.glob(TEMP_PREFIX + "*.replaced"):
        shutil.rmtree(old, ignore_errors=True)


def write_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, durably: written whole and fsynced. The
    mode is the usual one for new files (0666 less the umask)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_file(path: Path, data: bytes) -> None:
    """Write a file that no run folder's commits manage (a figure at `compare --out`): whole or
    not at all, through a temporary file beside it and one rename; an OSError (a full disk, a
    read-only or missing folder) is one line and leaves no temporary file."""
    path = Path(path)
    temporary = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}"
    try:
        try:
            write_file(temporary, data)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as error:
        raise MnistsumError(f"cannot write {fault_text(path, error)}; nothing was written") from None


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def write_json(path: Path, data: Any) -> None:
    """Replace one JSON file, as a commit of its folder."""
    path = Path(path)
    with commit(path.parent) as change:
        change.write_json(path.name, data)


# --------------------------------------------------------------------------- readers


def read_consistently(folder: Path, read: Callable[[], Result]) -> Result:
    """`read()`, which reads files of `folder`, rerun until no commit overlapped it (the
    generation before and after is the same and no journal was there), so that it sees one
    commit's files, never a mix. A journal whose writer died is finished first (under the lock)."""
    folder = Path(folder)
    deadline = time.monotonic() + READ_WAIT_SECONDS
    while True:
        before = _generation(folder)
        if before is None:
            _settle(folder, deadline)
            continue
        try:
            result = read()
        except (MnistsumError, OSError):
            if _generation(folder) == before:
                raise
        else:
            if _generation(folder) == before:
                return result
        if time.monotonic() > deadline:
            raise MnistsumError(f"{folder}/ changed during every read for {READ_WAIT_SECONDS:.0f} s: try again")


def _generation(folder: Path) -> Optional[bytes]:
    """The last commit's token (b"" before any), or None while a commit is unfinished. The
    generation is read before the journal is looked for: see read_consistently."""
    try:
        generation = read_file(folder / GENERATION, MAX_GENERATION_BYTES, stage=None)
    except Missing:
        generation = b""
    return None if (folder / JOURNAL).exists() else generation


def _settle(folder: Path, deadline: float) -> None:
    """A journal is there: wait while its writer is alive, else finish its commit."""
    try:
        if Path(os.path.abspath(folder)) in _held:
            recover(folder)
            return
        if not _locked_elsewhere(folder):
            with folder_lock(folder, "(finishing an interrupted change)", "folder"):
                return
    except FolderInUse:
        pass  # a writer came first: it finishes the change
    except OSError as error:
        raise folder_error(folder, error, "an interrupted change waits for a command that can write it") from None
    if time.monotonic() > deadline:
        raise MnistsumError(f"{folder}/ is being written and did not settle in {READ_WAIT_SECONDS:.0f} s: try again")
    time.sleep(0.005)


def read_json(path: Path, stage: str, max_bytes: int = MAX_SMALL_JSON_BYTES) -> Any:
    """Read a JSON artifact of at most `max_bytes` (a checked regular file: diskfiles.read_file);
    `stage` is the command that makes it, named in errors."""
    data = read_file(path, max_bytes, stage)
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # RecursionError: [[[[...
        raise MnistsumError(f"{path} is unreadable ({first_line(error)}): rerun `mnistsum {stage}`") from None


# --------------------------------------------------------------------------- Ctrl-C


@contextmanager
def sigint_recorded() -> Iterator[list[int]]:
    """While the block runs, Ctrl-C is noted in the yielded list instead of raised (only the
    main thread receives signals; elsewhere the list stays empty)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so that a set of files changes as a whole."""
    with sigint_recorded() as received:
        yield
    if received:
        raise KeyboardInterrupt
