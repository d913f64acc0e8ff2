"""Changing an artifacts or data folder safely.

A folder has one writer at a time: a lock file (flock, released by the OS when its holder dies)
that records the holder's pid and command. A writer changes the folder's set of files in one
commit: every new file is first written and fsynced under a temporary name, then a small
journal naming the renames is put in place with one atomic rename, then the renames run and
the journal goes. A kill, a full disk or Ctrl-C therefore leaves the folder as it was before
the journal appeared or, once it is there, as it will be after: the next command that takes
the lock finishes the renames and removes every temporary file. Readers never wait for a
writer's long run: they read between commits and retry when a commit overlapped (a seqlock on a
generation file each commit replaces). What a folder holds is data, never an instruction: a
journal runs only when each of its entries is one a commit of that folder writes, and nothing
is opened, renamed or removed through a link (the threat model in docs/reliability.md, which
tells the whole story).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

from mnistsum_cli.errors import MnistsumError, first_line
from mnistsum_cli.store.diskfiles import MAX_SMALL_JSON_BYTES, fault_text, read_file
from mnistsum_cli.store.paths import KEPT_NAME, DataDir, RunDir, unknown_run_name
from mnistsum_cli.terminal import notice

LOCK = ".mnistsum-lock"
JOURNAL = ".mnistsum-journal.json"
GENERATION = ".mnistsum-generation"
MAX_GENERATION_BYTES = 1024  # the generation file holds one commit's token (8 hex digits)
TEMP_PREFIX = ".mnistsum-tmp."  # every temporary file or folder, removed by the next writer
READ_WAIT_SECONDS = 10.0  # how long a reader waits for a commit in progress (commits take milliseconds)
INSTALL, MOVE = "install", "move"
MAX_JOURNAL_BYTES = 1 << 20  # a journal names a few renames: one this large is not one
OLD_TEMPORARY_FILE = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")  # see _old_temporary
OLD_TEMPORARY_FOLDER = re.compile(r"\.plots\.(?:[a-z0-9_]{8}\.tmp|[0-9a-f]{8}\.old)")
BLOCKED_PREFIX = ".mnistsum-blocked."  # what stood in the way of a rename, set aside (never removed)

Result = TypeVar("Result")

_held: dict[tuple[int, int], int] = {}  # folders this process holds the lock of (_identity) -> the lock's descriptor


class FolderInUse(MnistsumError):
    """Another live process holds the folder's lock."""


# --------------------------------------------------------------------------- errors


class FolderNotWritable(MnistsumError):
    """folder_error's line; `error` is the OSError, for a caller that knows better what is on disk."""

    def __init__(self, message: str, error: OSError) -> None:
        super().__init__(message)
        self.error = error


def folder_error(folder: Path, error: OSError, after: str = "nothing was changed") -> FolderNotWritable:
    """One line for an OSError met while writing `folder`: the folder, the cause, what is on disk."""
    cause = error.strerror or str(error)
    return FolderNotWritable(f"cannot write {folder}/: {cause}; {after}", error)


class _StepFailed(Exception):
    """A rename of a journal failed: which entry (1-based), and the OSError."""

    def __init__(self, index: int, entry: list[str], error: OSError) -> None:
        super().__init__(index, entry, error)
        self.index, self.entry, self.error = index, entry, error

    def describe(self) -> str:
        kind, source, target = self.entry
        cause = self.error.strerror or str(self.error)
        return f"entry {self.index}, {kind} {source} -> {target}: {cause}"


# --------------------------------------------------------------------------- the names a commit may touch


@functools.cache
def _run_file_names() -> frozenset[str]:
    """What a move may take into previous/<run id>/: a run's files, as paths.py declares them."""
    return frozenset(path.name for path in RunDir(Path()).run_files())


@functools.cache
def _installable_names() -> frozenset[str]:
    """What an install may replace: the files paths.py declares for a run or a dataset, and the
    store's own generation file."""
    return _run_file_names() | {path.name for path in DataDir(Path()).files()} | {GENERATION}


def _is_temporary(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and "/" not in name and "\0" not in name


def _lstat(path: Path) -> Optional[os.stat_result]:
    """The entry `path` names itself (a link, not what it points to), or None when there is none
    (a name the file system refuses, ENAMETOOLONG, names none)."""
    try:
        return os.lstat(path)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            return None
        raise


def _entry_problem(folder: Path, entry: Any, any_kept_name: bool = False) -> Optional[str]:
    """What makes `entry` one that no commit of `folder` writes, or None: an install takes a
    temporary file or folder of `folder` itself onto a name paths.py declares; a move takes such
    a name into previous/<kept run>/ under the same name, through real folders only (no link
    anywhere: a link could lead the rename out of `folder`), into a kept-run folder whose name
    mnistsum makes, or one already there (`any_kept_name`: any name; see _renamed_runs)."""
    if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(part, str) for part in entry)):
        return "not a [kind, source, target] of names"
    kind, source, target = entry
    if kind == INSTALL:
        if not _is_temporary(source):
            return f"installs from {source!r}, not a temporary file of the folder"
        if target not in _installable_names():
            return f"installs onto {target!r}, not a file mnistsum writes there"
        staged = _lstat(folder / source)
        if staged is not None and stat.S_ISLNK(staged.st_mode):
            return f"installs {source}, a symbolic link"
        return None
    if kind != MOVE:
        return f"{kind!r} is neither {INSTALL!r} nor {MOVE!r}"
    parts = target.split("/")
    previous = RunDir(Path()).previous.name
    if source not in _run_file_names() or len(parts) != 3 or parts[0] != previous or parts[2] != source:
        return f"moves {source!r} to {target!r}, not a run file to {previous}/<run id>/ under its name"
    if _leaves(parts[1]):
        return f"moves {source} to {target!r}, out of {previous}/"
    for depth in (1, 2):
        found = _lstat(folder.joinpath(*parts[:depth]))
        if found is not None and not stat.S_ISDIR(found.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(found.st_mode) else "not a folder"
            return f"moves {source} into {'/'.join(parts[:depth])}/, which is {what}"
    if not any_kept_name and found is None and not KEPT_NAME.fullmatch(parts[1]):  # one there: its moves began
        return f"moves {source} into {previous}/{parts[1]!r}/, a name mnistsum does not make"
    return None


def _leaves(name: str) -> bool:
    """Whether the path component `name` would not name an entry of its folder."""
    return name in ("", ".", "..") or "\0" in name


def _first_problem(folder: Path, operations: list[Any]) -> Optional[str]:
    """ "entry N <what is wrong>" for the first entry no commit of `folder` writes, or None."""
    for index, entry in enumerate(operations, 1):
        problem = _entry_problem(folder, entry)
        if problem is not None:
            return f"entry {index} {problem}"
    return None


def _journal_refused(folder: Path, why: str) -> MnistsumError:
    return MnistsumError(
        f"{folder}/{JOURNAL} is not a journal mnistsum writes ({why}): nothing of it was applied; "
        "if you did not put it there, remove it and run the command again"
    )


def _renamed_runs(folder: Path, operations: list[Any]) -> tuple[list[Any], dict[str, str]]:
    """`operations` with each kept-run folder whose name mnistsum does not make (a run id of 300
    letters from an older version: the file system refuses it) replaced by a fresh
    previous/unknown-<time>/, and what was renamed. A folder of that name that is already there
    (a real one: the file system took the name, and the journal's first moves went into it)
    keeps its name, so the run is not split over two folders. Any other entry stays as it is."""
    renamed: dict[str, str] = {}
    previous = RunDir(folder).previous
    fixed = []
    for entry in operations:
        if _entry_problem(folder, entry) is not None and _entry_problem(folder, entry, any_kept_name=True) is None:
            _, source, target = entry  # a move, wrong only in the name of a kept-run folder not there yet
            parts = target.split("/")
            if parts[1] not in renamed:
                renamed[parts[1]] = unused(previous / unknown_run_name(), taken=set(renamed.values())).name
            entry = [MOVE, source, "/".join([parts[0], renamed[parts[1]], parts[2]])]
        fixed.append(entry)
    return fixed, renamed


def unused(path: Path, taken: frozenset[str] | set[str] = frozenset()) -> Path:
    """`path`, or path-2, path-3...: the first that no entry holds (a dangling link counts) and
    that is not in `taken`."""
    candidate, number = path, 2
    while _lstat(candidate) is not None or candidate.name in taken:
        candidate, number = path.with_name(f"{path.name}-{number}"), number + 1
    return candidate


# --------------------------------------------------------------------------- the lock


def _identity(folder: Path) -> tuple[int, int]:
    """Which folder `folder` is, however it is reached (a link to it, another spelling)."""
    found = os.stat(folder)
    return found.st_dev, found.st_ino


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
    """The lock file's descriptor, never through a link, and only a regular file with no other
    name: the holder's pid is written into it, so a hard link to a file elsewhere would have that
    file overwritten."""
    path = folder / LOCK

    def refused(what: str) -> MnistsumError:
        return MnistsumError(f"{path} is {what}: nothing was changed; remove it to use {folder}/")

    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EISDIR):
            what = "a symbolic link, which mnistsum never makes" if error.errno == errno.ELOOP else "a folder"
            raise refused(what) from None
        raise
    found = os.fstat(descriptor)
    if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
        os.close(descriptor)
        raise refused("not a regular file" if not stat.S_ISREG(found.st_mode) else "a hard link to another file")
    return descriptor


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
    on_disk, opened = _lstat(folder / LOCK), os.fstat(descriptor)
    if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino):
        return descriptor
    os.close(descriptor)
    return None


def _locked_elsewhere(folder: Path) -> bool:
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


# --------------------------------------------------------------------------- recovery


def _read_journal(folder: Path) -> Optional[list[Any]]:
    """The operations of the journal in `folder`, or None when there is none. One that is a link,
    not a regular file, too large or not a journal's JSON is refused (one line)."""
    try:
        descriptor = os.open(folder / JOURNAL, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _journal_refused(folder, "a symbolic link") from None
        raise
    try:
        found = os.fstat(descriptor)
        if not stat.S_ISREG(found.st_mode):
            raise _journal_refused(folder, "not a regular file")
        if found.st_size > MAX_JOURNAL_BYTES:
            raise _journal_refused(folder, f"{found.st_size} bytes")
        data = os.read(descriptor, MAX_JOURNAL_BYTES + 1)
    finally:
        os.close(descriptor)
    try:
        operations = json.loads(data)["operations"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise _journal_refused(folder, "not a journal's JSON") from None
    if not isinstance(operations, list):
        raise _journal_refused(folder, "not a journal's JSON")
    return operations


def recover(folder: Path) -> None:
    """Under the lock: finish the commit a killed writer left (its journal), then remove every
    temporary file and folder. The whole journal is checked first: one with an entry that no
    commit of this folder writes (a name outside it, a link on the way) is refused, whole, and
    left in place; a kept-run folder name mnistsum does not make (a 300-letter run id an older
    version took as it was: the file system refuses it) gets a fresh one, and a folder where a
    file goes (or a file where a folder goes) is set aside as .mnistsum-blocked.<token>.<name>,
    each said in a note: neither stops the change, and neither loses a file."""
    try:
        operations = _read_journal(folder)
        if operations is not None:
            operations, renamed = _renamed_runs(folder, operations)
            problem = _first_problem(folder, operations)
            if problem is not None:
                raise _journal_refused(folder, problem)
            if renamed:
                _rewrite_journal(folder, operations)
                for old, new in renamed.items():
                    notice(
                        f"{folder}/: the interrupted change keeps a run in previous/{_shown_name(old)}/, a name "
                        f"mnistsum does not make: it goes to previous/{new}/ instead"
                    )
            _apply(folder, operations)
            _fsync_folder(folder)
            (folder / JOURNAL).unlink()
    except _StepFailed as failed:
        raise MnistsumError(
            f"cannot finish the change recorded in {folder}/{JOURNAL} ({failed.describe()}): it stays recorded, "
            f"nothing of it is lost; fix the cause, then any mnistsum command that writes {folder}/ finishes it"
        ) from None
    except OSError as error:
        raise MnistsumError(
            f"cannot finish the change recorded in {folder}/{JOURNAL} ({error.strerror or error}): it stays "
            f"recorded; fix the cause, then any mnistsum command that writes {folder}/ finishes it"
        ) from None
    _remove_temporaries(folder)


def _shown_name(name: str) -> str:
    """A name from a journal in a message: as it is, control characters escaped (a planted one
    cannot rewrite the terminal), cut to 40 characters with "..." only when longer."""
    text = name if name.isprintable() else repr(name)[1:-1]
    return text if len(text) <= 40 else text[:37] + "..."


def _rewrite_journal(folder: Path, operations: list[Any]) -> None:
    """Replace the journal by `operations`, in one rename (a kill leaves the old or the new)."""
    staged = folder / f"{TEMP_PREFIX}{secrets.token_hex(4)}.journal"
    write_file(staged, json_bytes({"operations": operations}))
    os.replace(staged, folder / JOURNAL)
    _fsync_folder(folder)


def _old_temporary(name: str, found: os.stat_result) -> bool:
    """Whether the entry `name` (lstat `found`) is a temporary of mnistsum before the store, by
    exactly the names it made: .<file>.<8 of tempfile's [a-z0-9_]>.tmp, a regular file
    (tempfile.mkstemp beside each file of a run or dataset it wrote); .plots.<8 of the
    same>.tmp, a folder (mkdtemp, the plots' staging); .plots.<8 hex>.old, a folder (the plots
    it replaced)."""
    if stat.S_ISDIR(found.st_mode):
        return OLD_TEMPORARY_FOLDER.fullmatch(name) is not None
    match = OLD_TEMPORARY_FILE.fullmatch(name)
    return (
        stat.S_ISREG(found.st_mode)
        and match is not None
        and match.group(1) in _installable_names() - {GENERATION, RunDir(Path()).plots.name}
    )


def _remove_temporaries(folder: Path) -> None:
    """Remove every temporary file and folder directly in `folder`, never through a link (a
    linked temporary is removed as a link). One that cannot be removed now is left for the next
    writer: it holds nothing of the folder's."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(TEMP_PREFIX):
            _remove(folder / name)
        elif (found := _lstat(folder / name)) is not None and _old_temporary(name, found):
            _remove(folder / name)


def _remove(path: Path) -> None:
    """Remove `path` itself: a real folder with all it holds (links in it are removed, not
    followed), anything else (a link included) by unlinking it."""
    found = _lstat(path)
    try:
        if found is not None and stat.S_ISDIR(found.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        elif found is not None:
            os.unlink(path)
    except OSError:
        pass


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
        _remove(leftover)


def _commit(change: Change) -> None:
    folder = change.folder
    generation = change._temporary()
    write_file(generation, change.token.encode())
    operations = change.operations + [[INSTALL, generation.name, GENERATION]]
    problem = _first_problem(folder, operations)  # what the next writer would refuse is never journaled
    if problem is not None:
        raise MnistsumError(f"cannot write {folder}/ ({problem}); nothing was changed")
    staged_journal = change._temporary()
    write_file(staged_journal, json_bytes({"operations": operations}))
    with interrupts_deferred():
        os.replace(staged_journal, folder / JOURNAL)
        change.journaled = True
        _fsync_folder(folder)  # the journal survives a power cut: from here the change is made
        try:
            _apply(folder, operations)
            _fsync_folder(folder)
        except (_StepFailed, OSError) as error:
            cause = error.error if isinstance(error, _StepFailed) else error
            raise folder_error(
                folder, cause, f"the change is recorded and the next mnistsum command that writes {folder}/ finishes it"
            ) from None
        (folder / JOURNAL).unlink()


def _apply(folder: Path, operations: list[list[str]]) -> None:
    """Run a journal's renames (checked by _entry_problem); each one is skipped when already
    done, so running them again after a kill finishes the change. An install replaces its
    target (a folder target is first renamed to a temporary name); a move goes to a name that
    did not exist. A failed rename is _StepFailed, naming its entry."""
    for index, entry in enumerate(operations, 1):
        kind, source, target = entry
        try:
            if kind == INSTALL:
                _install(folder, source, target)
            else:
                _move(folder, source, target, _installed_over(folder, source, operations[index:]))
        except OSError as error:
            raise _StepFailed(index, entry, error) from None
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX) and name.endswith(".replaced"):
            _remove(folder / name)


def _install(folder: Path, source_name: str, target_name: str) -> None:
    """Rename the staged `source_name` onto `target_name`, both directly in `folder` (a rename
    replaces a link itself, never what it points to). What stands in the way and is not the
    same kind (a folder where a file goes, a file where the plots folder goes) is set aside,
    not destroyed."""
    source, target = folder / source_name, folder / target_name
    staged, present = _lstat(source), _lstat(target)
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
    return any(kind == INSTALL and target == name and _lstat(folder / source) is None for kind, source, target in later)


def _move(folder: Path, source_name: str, target: str, installed_over: bool) -> None:
    """Rename `source_name` (directly in `folder`) to previous/<kept>/<name>, creating those two
    folders, each opened without following a link, so the rename cannot leave `folder`. When
    the target exists and `source_name` is still the file to move (`installed_over` is false),
    the target is not ours (planted): the source is set aside as .mnistsum-blocked.<token>.<name>
    rather than left for a later install to replace."""
    previous, kept, name = target.split("/")
    root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _lstat(folder / source_name) is None:
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
        found = _lstat(folder)
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


def _fsync_folder(folder: Path) -> None:
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


def write_json(path: Path, data: Any) -> None:
    """Replace one JSON file, as a commit of its folder."""
    path = Path(path)
    with commit(path.parent) as change:
        change.write_json(path.name, data)


# --------------------------------------------------------------------------- readers


def read_consistently(folder: Path, read: Callable[[], Result], kept: bool = False) -> Result:
    """`read()`, which reads files of `folder`, rerun until no commit overlapped it (the
    generation before and after is the same and no journal was there), so that it sees one
    commit's files, never a mix. A journal whose writer died is finished first (under the lock,
    after the checks of recover: a journal no commit writes is refused in one line). A `kept`
    run (previous/<run id>/) is never a commit's folder: a journal there was put there by
    someone else, and is refused in one line without being run.

    Why that suffices (a seqlock): a commit puts its journal in place (time J), renames the
    files, installs its new generation (G) and removes the journal (D), J < renames < G < D. Each
    check below (_generation) looks for the journal first (time j) and reads the generation
    after (time g). Say a commit renamed a file during read(). The opening check found no journal
    at j1, before that rename, so j1 < J; the closing check found none at j2 after the rename,
    so D < j2 < g2: the closing generation is this commit's or a later one's, never the one read
    at g1 < the rename < G, and read() runs again. Read in the other order, the closing
    generation could come from just before G and the journal be looked for just after D: both
    checks pass over a mix of two commits."""
    folder = Path(folder)
    deadline = time.monotonic() + READ_WAIT_SECONDS
    if kept and os.path.lexists(folder / JOURNAL):
        raise _journal_refused(folder, "a kept run, which no commit writes")
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
    journal is looked for before the generation is read: see read_consistently."""
    if os.path.lexists(folder / JOURNAL):
        return None
    return _generation_token(folder)


def _generation_token(folder: Path) -> bytes:
    """What the generation file holds (a few bytes), never through a link nor from anything but
    a regular file within its cap (diskfiles.read_file): b"" then, as before the first commit.
    A planted one changes nothing a reader trusts: the next commit installs a real one over it,
    and the journal, looked for first, is what tells a commit under way."""
    try:
        return read_file(folder / GENERATION, MAX_GENERATION_BYTES, stage=None)
    except MnistsumError:  # missing, a link, a FIFO, a folder, too large, unreadable
        return b""


def _settle(folder: Path, deadline: float) -> None:
    """A journal is there: wait while its writer is alive, else finish its commit (a reader
    that cannot take the lock, on read-only media, says that the change waits)."""
    try:
        held = _identity(folder) in _held
    except OSError:
        return  # the folder went: the next look says what is there now
    try:
        if held:
            recover(folder)
            return
        if not _locked_elsewhere(folder):
            with folder_lock(folder, "(finishing an interrupted change)", "folder"):
                return
    except FolderInUse:
        pass  # a writer came first: it finishes the change
    except FolderNotWritable as failed:
        raise folder_error(
            folder, failed.error, "an interrupted change waits for a command that can write it"
        ) from None
    if time.monotonic() > deadline:
        raise MnistsumError(f"{folder}/ is being written and did not settle in {READ_WAIT_SECONDS:.0f} s: try again")
    time.sleep(0.005)


def read_json(path: Path, stage: str, max_bytes: int = MAX_SMALL_JSON_BYTES) -> Any:
    """Read a JSON artifact of at most `max_bytes` (a checked regular file: diskfiles.read_file);
    `stage` is the command that makes it, named in errors."""
    data = read_file(path, max_bytes, stage)
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # ValueError: bad JSON, a 5000-digit number
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
