"""What the next writer does first, under the lock: finish the commit a killed writer left (its
journal, checked whole before any of it runs), then remove every temporary file and folder,
ours and those of versions before the store, never through a link."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.diskfiles import entry_status
from mnistsum_cli.store.journal import (
    GENERATION,
    JOURNAL,
    first_problem,
    installable_names,
    journal_refused,
    read_journal,
    renamed_runs,
    rewrite_journal,
)
from mnistsum_cli.store.paths import RunDir
from mnistsum_cli.store.renames import StepFailed, apply
from mnistsum_cli.store.writes import TEMP_PREFIX, fsync_folder, remove_entry
from mnistsum_cli.terminal import notice

OLD_TEMPORARY_FILE = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")  # see _old_temporary
OLD_TEMPORARY_FOLDER = re.compile(r"\.plots\.(?:[a-z0-9_]{8}\.tmp|[0-9a-f]{8}\.old)")


def recover(folder: Path) -> None:
    """Under the lock: finish the commit a killed writer left (its journal), then remove every
    temporary file and folder. The whole journal is checked first: one with an entry that no
    commit of this folder writes (a name outside it, a link on the way) is refused, whole, and
    left in place; a kept-run folder name mnistsum does not make (a 300-letter run id an older
    version took as it was: the file system refuses it) gets a fresh one, and a folder where a
    file goes (or a file where a folder goes) is set aside as .mnistsum-blocked.<token>.<name>,
    each said in a note: neither stops the change, and neither loses a file."""
    try:
        operations = read_journal(folder)
        if operations is not None:
            operations, renamed = renamed_runs(folder, operations)
            problem = first_problem(folder, operations)
            if problem is not None:
                raise journal_refused(folder, problem)
            if renamed:
                rewrite_journal(folder, operations)
                for old, new in renamed.items():
                    notice(
                        f"{folder}/: the interrupted change keeps a run in previous/{_shown_name(old)}/, a name "
                        f"mnistsum does not make: it goes to previous/{new}/ instead"
                    )
            apply(folder, operations)
            fsync_folder(folder)
            (folder / JOURNAL).unlink()
    except StepFailed as failed:
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
        and match.group(1) in installable_names() - {GENERATION, RunDir(Path()).plots.name}
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
            remove_entry(folder / name)
        elif (found := entry_status(folder / name)) is not None and _old_temporary(name, found):
            remove_entry(folder / name)
