"""Ctrl-C held back while a set of files changes as a whole (a commit, an epoch's commit), or
only noted (a training rank that lets rank 0 stop first)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


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
