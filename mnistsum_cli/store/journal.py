"""The journal of a commit under way: the renames it names, and what makes an entry one that a
commit of the folder writes.

A commit stages its files under temporary names, then puts a journal in place (one atomic
rename) naming the renames that follow: "install" a temporary entry onto a name paths.py
declares, "move" a run's file into previous/<kept run>/. A journal found later is finished by
the next writer (recovery.py), so it is data that someone may have planted: it runs only when
each of its entries is one a commit of that folder writes (`first_problem`), and it is read
as a checked regular file within its cap (diskfiles.open_regular). The generation file, which
each commit replaces, tells readers which commit they saw (reads.py).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Optional

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.diskfiles import SYMLINK, TOO_LARGE, Unfit, entry_status, open_regular
from mnistsum_cli.store.paths import KEPT_NAME, DataDir, RunDir, unknown_run_name
from mnistsum_cli.store.writes import TEMP_PREFIX, fsync_folder, json_bytes, unused, write_file

JOURNAL = ".mnistsum-journal.json"
GENERATION = ".mnistsum-generation"
INSTALL, MOVE = "install", "move"
MAX_JOURNAL_BYTES = 1 << 20  # a journal names a few renames: one this large is not one


@functools.cache
def _run_file_names() -> frozenset[str]:
    """What a move may take into previous/<run id>/: a run's files, as paths.py declares them."""
    return frozenset(path.name for path in RunDir(Path()).run_files())


@functools.cache
def installable_names() -> frozenset[str]:
    """What an install may replace: the files paths.py declares for a run or a dataset, and the
    store's own generation file."""
    return _run_file_names() | {path.name for path in DataDir(Path()).files()} | {GENERATION}


def _is_temporary(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and "/" not in name and "\0" not in name


def _entry_problem(folder: Path, entry: Any, any_kept_name: bool = False) -> Optional[str]:
    """What makes `entry` one that no commit of `folder` writes, or None: an install takes a
    temporary file or folder of `folder` itself onto a name paths.py declares; a move takes such
    a name into previous/<kept run>/ under the same name, through real folders only (no link
    anywhere: a link could lead the rename out of `folder`), into a kept-run folder whose name
    mnistsum makes, or one already there (`any_kept_name`: any name; see renamed_runs)."""
    if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(part, str) for part in entry)):
        return "not a [kind, source, target] of names"
    kind, source, target = entry
    if kind == INSTALL:
        if not _is_temporary(source):
            return f"installs from {source!r}, not a temporary file of the folder"
        if target not in installable_names():
            return f"installs onto {target!r}, not a file mnistsum writes there"
        staged = entry_status(folder / source)
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
        found = entry_status(folder.joinpath(*parts[:depth]))
        if found is not None and not stat.S_ISDIR(found.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(found.st_mode) else "not a folder"
            return f"moves {source} into {'/'.join(parts[:depth])}/, which is {what}"
    if not any_kept_name and found is None and not KEPT_NAME.fullmatch(parts[1]):  # one there: its moves began
        return f"moves {source} into {previous}/{parts[1]!r}/, a name mnistsum does not make"
    return None


def _leaves(name: str) -> bool:
    """Whether the path component `name` would not name an entry of its folder."""
    return name in ("", ".", "..") or "\0" in name


def first_problem(folder: Path, operations: list[Any]) -> Optional[str]:
    """ "entry N <what is wrong>" for the first entry no commit of `folder` writes, or None."""
    for index, entry in enumerate(operations, 1):
        problem = _entry_problem(folder, entry)
        if problem is not None:
            return f"entry {index} {problem}"
    return None


def journal_refused(folder: Path, why: str) -> MnistsumError:
    """The one line for a journal that is not one mnistsum writes: nothing of it runs."""
    return MnistsumError(
        f"{folder}/{JOURNAL} is not a journal mnistsum writes ({why}): nothing of it was applied; "
        "if you did not put it there, remove it and run the command again"
    )


def renamed_runs(folder: Path, operations: list[Any]) -> tuple[list[Any], dict[str, str]]:
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


def read_journal(folder: Path) -> Optional[list[Any]]:
    """The operations of the journal in `folder`, or None when there is none. One that is a link,
    not a regular file, too large or not a journal's JSON is refused (one line)."""
    try:
        descriptor = open_regular(folder / JOURNAL, MAX_JOURNAL_BYTES)
    except FileNotFoundError:
        return None
    except Unfit as unfit:
        why = {SYMLINK: "a symbolic link", TOO_LARGE: f"{unfit.size} bytes"}.get(unfit.reason, "not a regular file")
        raise journal_refused(folder, why) from None
    with os.fdopen(descriptor, "rb") as handle:
        data = handle.read(MAX_JOURNAL_BYTES + 1)
    try:
        operations = json.loads(data)["operations"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise journal_refused(folder, "not a journal's JSON") from None
    if not isinstance(operations, list):
        raise journal_refused(folder, "not a journal's JSON")
    return operations


def rewrite_journal(folder: Path, operations: list[Any]) -> None:
    """Replace the journal by `operations`, in one rename (a kill leaves the old or the new)."""
    staged = folder / f"{TEMP_PREFIX}{secrets.token_hex(4)}.journal"
    write_file(staged, json_bytes({"operations": operations}))
    os.replace(staged, folder / JOURNAL)
    fsync_folder(folder)
