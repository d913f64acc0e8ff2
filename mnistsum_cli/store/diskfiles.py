"""Reading the files of run and data folders without trusting them, and the one wording of a
file-system fault.

A file in an artifacts or data folder may be anything by the time it is read: a folder, a FIFO
(a read blocks for ever), a symbolic link to /dev/zero (a read never ends), a file of
gigabytes, or a small file that declares gigabytes. Every reader therefore opens the file once,
without blocking and without following a final symbolic link, checks through that descriptor
that it is a regular file no larger than its kind can be, and only then reads it: the one
checked open is `open_regular`; artifacts are read through `read_file`, `opened` and
`read_json`, which word its refusals; the store's own lock and journal word them their way.
mnistsum writes every artifact as a regular file renamed into place (transactions.py), so a
symbolic link in place of one is never its own: it is refused, whatever it points at, rather
than followed into another folder. The folders themselves may be links. Within
`each_file_read_once` (`status`) a file still at the version read before is not read again.

Any OSError on an artifact path, read or write, becomes one line naming the path and the cause
(`fault_text`): these messages, and cli.main's last resort for an OSError that no reader caught.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

from mnistsum_cli.errors import MnistsumError, first_line

MIB = 1 << 20

# The most bytes each kind of file may have; each is a generous multiple of the largest real one,
# so that a damaged or hostile file is refused before it is read rather than filling memory.
MAX_SMALL_JSON_BYTES = 4 * MIB  # train_state, config, an evaluation (~30 KB with its 100 misclassified rows), manifest
MAX_HISTORY_BYTES = 256 * MIB  # one epoch record per epoch, at most ~0.1 MB with its 200 step records: 2000+ epochs
MAX_MODEL_BYTES = 64 * MIB  # the largest model of models.py, convnet, is 3.4 MB in safetensors (tests/test_faults.py)
MAX_CHECKPOINT_BYTES = 4 * MAX_MODEL_BYTES  # the weights and AdamW's two moments: about 3 x the model
MAX_SPLIT_BYTES = 64 * MIB  # a split of all 60000 MNIST training images is about 0.45 MB of Parquet
MAX_PLOT_BYTES = 64 * MIB  # a figure of plot.py at 120 dpi is at most a few hundred KB
# A split's rows each take a different image of its MNIST set (prepare.build_splits) through a
# uint16 image_index: no split has more rows than this, whatever its footer declares.
MAX_SPLIT_ROWS = 1 << 16

_CHECKED_FLAGS = os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC  # a FIFO opens at once, a link not at all


def fault_text(path: Union[Path, str, bytes, None], error: OSError) -> str:
    """One line for an OSError met on `path` (the error's own file names when None): the path(s)
    and the cause, e.g. "artifacts/history.json: Is a directory"."""
    cause = error.strerror or type(error).__name__
    names = [path] if path is not None else [name for name in (error.filename, error.filename2) if name is not None]
    shown = " -> ".join(os.fsdecode(name) if isinstance(name, bytes) else str(name) for name in names)
    return f"{shown}: {cause}" if shown else cause


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


class Missing(MnistsumError):
    """The file is not there (or a folder on its path is a file)."""


# Why an entry is not a file its reader may take (Unfit.reason).
SYMLINK, NOT_A_FILE, TOO_LARGE, HARD_LINKED = "symlink", "not a file", "too large", "hard linked"


class Unfit(Exception):
    """What open_regular found at a path in place of a file its reader may take, for that reader
    to word: `reason` SYMLINK, NOT_A_FILE (`kind` says what instead: "a folder", "a FIFO"...),
    TOO_LARGE (`size` bytes) or HARD_LINKED (a regular file with another name elsewhere)."""

    def __init__(self, reason: str, kind: str = "", size: int = 0) -> None:
        super().__init__(reason, kind, size)
        self.reason, self.kind, self.size = reason, kind, size


def open_regular(path: Path, max_bytes: Optional[int], flags: int = os.O_RDONLY, one_name: bool = False) -> int:
    """The one checked open of a folder's file: a descriptor of `path`, opened without blocking
    and without following a final symbolic link, then checked through that descriptor to be a
    regular file of at most `max_bytes` (None: any size) and, with `one_name`, with no other
    name (a file written through a hard link changes the file elsewhere too). `flags` are the
    access (os.O_RDWR | os.O_CREAT: the lock file, created 0666 less the umask). Raises Unfit
    for an entry that is not such a file; os.open's OSError (FileNotFoundError: nothing there)
    and ValueError (a NUL byte in the name) pass on. The caller closes the descriptor."""
    try:
        descriptor = os.open(path, flags | _CHECKED_FLAGS, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            raise Unfit(SYMLINK) from None
        if error.errno == errno.EISDIR:  # a folder, opened for writing
            raise Unfit(NOT_A_FILE, "a folder") from None
        raise
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise Unfit(NOT_A_FILE, _kind(info.st_mode))
        if max_bytes is not None and info.st_size > max_bytes:
            raise Unfit(TOO_LARGE, size=info.st_size)
        if one_name and info.st_nlink != 1:
            raise Unfit(HARD_LINKED)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def open_checked(path: Path, max_bytes: int, stage: Optional[str]) -> int:
    """An artifact's descriptor (open_regular); any problem is one MnistsumError naming the file
    and, when it is damage, the stage that makes it (`stage` None: a file of the store's own,
    named alone). The caller closes the descriptor."""
    rerun = f": rerun `mnistsum {stage}`" if stage else ""
    try:
        return open_regular(path, max_bytes)
    except Unfit as unfit:
        if unfit.reason == SYMLINK:
            raise MnistsumError(
                f"{path} is a symbolic link, not a file mnistsum wrote (it writes regular files){rerun}"
            ) from None
        if unfit.reason == TOO_LARGE:
            raise MnistsumError(
                f"{path} is {unfit.size:,} bytes, more than such a file can be ({max_bytes:,}){rerun}"
            ) from None
        raise MnistsumError(f"{path} is not a file ({unfit.kind}){rerun}") from None
    except (FileNotFoundError, NotADirectoryError):
        raise Missing(f"{path} not found" + (f": run `mnistsum {stage}` first" if stage else "")) from None
    except OSError as error:
        raise MnistsumError(f"cannot read {fault_text(path, error)}") from None
    except ValueError as error:  # a NUL byte in the name
        raise MnistsumError(f"{path!r}: {error}") from None


@contextmanager
def opened(path: Path, max_bytes: int, stage: Optional[str]) -> Iterator[BinaryIO]:
    """`path` open for reading as a checked file (open_checked); read errors are one line too."""
    with os.fdopen(open_checked(path, max_bytes, stage), "rb") as handle:
        try:
            yield handle
        except OSError as error:
            raise MnistsumError(f"cannot read {fault_text(path, error)}") from None


def read_file(path: Path, max_bytes: int, stage: Optional[str]) -> bytes:
    """The whole of `path`, read once through a checked descriptor (see open_checked): a file
    that grows past `max_bytes` while it is read is refused too."""
    return read_with_status(path, max_bytes, stage)[1]


def read_json(path: Path, stage: str, max_bytes: int = MAX_SMALL_JSON_BYTES) -> Any:
    """A JSON artifact of at most `max_bytes`, read as a checked file (read_file) and decoded;
    `stage` is the command that makes it, named in errors."""
    data = read_file(path, max_bytes, stage)
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # ValueError: bad JSON, a 5000-digit number
        raise MnistsumError(f"{path} is unreadable ({first_line(error)}): rerun `mnistsum {stage}`") from None


def read_with_status(path: Path, max_bytes: int, stage: Optional[str]) -> tuple[os.stat_result, bytes]:
    """read_file, and the status of the file read (its inode, size and time: which version it was)."""
    if _read_before is not None:
        try:
            status = os.lstat(path)
        except OSError:
            pass  # the open below says why in its own words
        else:
            if _version(status) in _read_before:
                return status, _read_before[_version(status)]
    with opened(path, max_bytes, stage) as handle:
        status, data = os.fstat(handle.fileno()), handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise MnistsumError(f"{path} grew past {max_bytes:,} bytes while it was read")
    if _read_before is not None:
        _read_before[_version(status)] = data
    return status, data


_read_before: Optional[dict[tuple[int, ...], bytes]] = None  # within each_file_read_once: version -> bytes


def _version(status: os.stat_result) -> tuple[int, ...]:
    """Which file and which version of it: a commit replaces a file (a new inode), and any write
    changes its times."""
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


@contextmanager
def each_file_read_once() -> Iterator[None]:
    """Within the block a file that is still the version read before (checked then) is not read
    again: `status` judges several stages from the same files (the model's header, its hash for
    the evaluation and for the plots) and reads each once."""
    global _read_before
    outer, _read_before = _read_before, {} if _read_before is None else _read_before
    try:
        yield
    finally:
        _read_before = outer


def entry_status(path: Path) -> Optional[os.stat_result]:
    """The entry `path` names itself (a link, not what it points to), or None when there is none
    (a name the file system refuses, ENAMETOOLONG, names none)."""
    try:
        return os.lstat(path)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            return None
        raise


def require(path: Path, max_bytes: int, stage: str) -> None:
    """Refuse a missing or unreadable input now, as read_file would later: a command checks its
    inputs this way before it imports torch (seconds and hundreds of MB)."""
    os.close(open_checked(path, max_bytes, stage))
