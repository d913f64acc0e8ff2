"""Reading the files of run and data folders without trusting them, and the one wording of a
file-system fault.

A file in an artifacts or data folder may be anything by the time it is read: a folder, a FIFO
(a read blocks for ever), a symbolic link to /dev/zero (a read never ends), a file of
gigabytes, or a small file that declares gigabytes. Every reader therefore opens the file once,
without blocking and without following a final symbolic link, checks through that descriptor
that it is a regular file no larger than its kind can be, and only then reads it (`read_file`,
`opened`). mnistsum writes every artifact as a regular file renamed into place (store.py), so a
symbolic link in place of one is never its own: it is refused, whatever it points at, rather
than followed into another folder. The folders themselves may be links. Within
`each_file_read_once` (`status`) a file still at the version read before is not read again.

Any OSError on an artifact path, read or write, becomes one line naming the path and the cause
(`fault_text`): these messages, and cli.main's last resort for an OSError that no reader caught.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

from mnistsum_cli.errors import MnistsumError

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

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC  # a FIFO opens at once, a link not at all


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


def open_checked(path: Path, max_bytes: int, stage: Optional[str]) -> int:
    """A descriptor of `path`, checked to be a regular file (not a link to one) of at most
    `max_bytes`; any problem is one MnistsumError naming the file and, when it is damage, the
    stage that makes it (`stage` None: a file of the store's own, named alone). The caller
    closes the descriptor."""
    rerun = f": rerun `mnistsum {stage}`" if stage else ""
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise Missing(f"{path} not found" + (f": run `mnistsum {stage}` first" if stage else "")) from None
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            raise MnistsumError(
                f"{path} is a symbolic link, not a file mnistsum wrote (it writes regular files){rerun}"
            ) from None
        raise MnistsumError(f"cannot read {fault_text(path, error)}") from None
    except ValueError as error:  # a NUL byte in the name
        raise MnistsumError(f"{path!r}: {error}") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise MnistsumError(f"{path} is not a file ({_kind(info.st_mode)}){rerun}")
        if info.st_size > max_bytes:
            raise MnistsumError(
                f"{path} is {info.st_size:,} bytes, more than such a file can be ({max_bytes:,}){rerun}"
            )
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


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


def require(path: Path, max_bytes: int, stage: str) -> None:
    """Refuse a missing or unreadable input now, as read_file would later: a command checks its
    inputs this way before it imports torch (seconds and hundreds of MB)."""
    os.close(open_checked(path, max_bytes, stage))
