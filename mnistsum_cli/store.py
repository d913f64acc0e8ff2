"""Writing artifacts safely: every write is atomic (temporary file in the same folder, flush,
fsync, rename), Ctrl-C can be held while a set of files changes, and reads turn damage into a
MnistsumError that names the stage to rerun."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from mnistsum_cli.errors import MnistsumError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    On any error (Ctrl-C included) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and some writers) make 0600: use the usual mode
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


@contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; on success it replaces `folder` as a whole.

    On any error the temporary folder is removed and `folder` is untouched. The swap (two
    renames) holds Ctrl-C and puts the old folder back if the second rename fails.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield staging
        with interrupts_deferred():
            old = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.old"
            if folder.exists():
                os.rename(folder, old)
            try:
                os.rename(staging, folder)
            except BaseException:
                if old.exists():
                    os.rename(old, folder)
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: Path, stage: str) -> Any:
    """Read a JSON artifact; `stage` is the command that makes it, named in errors."""
    if not path.exists():
        raise MnistsumError(f"{path} not found: run `mnistsum {stage}` first")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MnistsumError(f"{path} is unreadable ({error}): rerun `mnistsum {stage}`") from None
