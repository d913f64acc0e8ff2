"""Worker processes for `serve`: copies of the server, forked after the model is loaded, that
accept connections on the same listening socket, so that a CPU-bound prediction uses every
core (one Python process runs one at a time).

Forking shares the loaded model and the imported libraries copy-on-write, so a worker costs
little memory and starts at once. Each worker stops with the parent however the parent ends:
it watches a pipe whose write end only the parent holds, and the system closes that end when
the parent exits, even when it is killed. Ctrl-C in a terminal reaches every process of the
group; each one finishes its requests and exits by itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from mnistsum_cli.errors import MnistsumError

STOP_SECONDS = 10.0  # how long the parent waits for its workers to finish their requests before it kills them


@contextmanager
def forked_workers(count: int, serve: Callable[[], None], stop: Callable[[], None]) -> Iterator[list[int]]:
    """`count` forked processes running `serve()` while the block runs; yields their pids. In a
    worker, `stop()` is called from a thread once the parent is gone; `serve` must then return.
    A worker exits with 0, or 1 when `serve` raised; it never returns into the caller's code."""
    read_end, write_end = os.pipe()
    pids: list[int] = []
    try:
        for _ in range(count):
            try:
                pid = os.fork()
            except OSError as error:  # out of processes or memory: the ones started are stopped below
                raise MnistsumError(
                    f"cannot start {count} worker processes: {error.strerror}; try fewer --workers"
                ) from None
            if pid == 0:
                code = 1
                try:
                    os.close(write_end)
                    threading.Thread(target=_stop_without_parent, args=(read_end, stop), daemon=True).start()
                    serve()
                    code = 0
                except KeyboardInterrupt:
                    code = 0
                except BaseException as error:  # the other workers and the parent go on serving
                    print(f"a worker process stopped: {error or type(error).__name__}", file=sys.stderr, flush=True)
                finally:
                    os._exit(code)
            pids.append(pid)
        yield pids
    finally:
        os.close(write_end)  # every worker sees the parent leave and stops
        os.close(read_end)
        _reap(pids)


def _stop_without_parent(read_end: int, stop: Callable[[], None]) -> None:
    os.read(read_end, 1)  # returns b"" once no process holds the write end: the parent is gone
    stop()


def _reap(pids: list[int]) -> None:
    """Wait for the workers to exit, killing those still running after STOP_SECONDS."""
    deadline = time.monotonic() + STOP_SECONDS
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    waiting.discard(pid)
            except ChildProcessError:
                waiting.discard(pid)
        time.sleep(0.05)
    for pid in waiting:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
