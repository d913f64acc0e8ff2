"""Reading a folder's files as one commit left them, without waiting for a writer's long run.

Readers take no lock: they read between commits and read again when a commit overlapped (a
seqlock on the generation file each commit replaces, `read_consistently` gives the argument).
A journal whose writer died is finished first, under the lock; a journal in a kept run, which
no commit writes, is refused without being run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.diskfiles import read_file
from mnistsum_cli.store.journal import GENERATION, JOURNAL, journal_refused
from mnistsum_cli.store.locks import FolderInUse, folder_lock, held_here, locked_elsewhere
from mnistsum_cli.store.recovery import recover
from mnistsum_cli.store.writes import FolderNotWritable, folder_error

MAX_GENERATION_BYTES = 1024  # the generation file holds one commit's token (8 hex digits)
READ_WAIT_SECONDS = 10.0  # how long a reader waits for a commit in progress (commits take milliseconds)

Result = TypeVar("Result")


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
        raise journal_refused(folder, "a kept run, which no commit writes")
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
        held = held_here(folder)
    except OSError:
        return  # the folder went: the next look says what is there now
    try:
        if held:
            recover(folder)
            return
        if not locked_elsewhere(folder):
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
