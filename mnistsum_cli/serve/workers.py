"""Worker processes for `serve`: copies of the server, forked after the model is loaded, that
accept connections on the same listening socket, so that a CPU-bound prediction uses every
core (one Python process runs one at a time).

Forking shares the loaded model and the imported libraries copy-on-write, so a worker costs
little memory and starts at once. Each worker stops with the parent however the parent ends:
it watches a pipe whose write end only the parent holds, and the system closes that end when
the parent exits, even when it is killed; a worker then has STOP_SECONDS to finish its
requests. Ctrl-C in a terminal reaches every process of the group; each one finishes its
requests and exits by itself. A worker that dies is reported; the others go on serving.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

from mnistsum_cli.errors import BadOption, MnistsumError

CGROUPS = Path("/sys/fs/cgroup")  # where the cgroup hierarchies are mounted
MEMBERSHIP = Path("/proc/self/cgroup")  # this process's cgroup in each hierarchy
STOP_SECONDS = 10.0  # the longest a stopping worker may take to finish its requests before it is killed
MAX_DEFAULT_WORKERS = 4  # the default's ceiling: more processes need more clients than a local page has


def default_workers(on_cpu: bool, cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> int:
    """One process per core this process may use, at most MAX_DEFAULT_WORKERS, on the CPU; one
    on a GPU or without fork(). The cores it may use: its affinity mask (which `taskset` and
    cpusets set), or the CPU quota of its cgroup (a container's `--cpus`, a systemd CPUQuota)
    rounded up, whichever is less: a container given 2 CPUs of a 64-core host sees all 64 in
    its affinity mask, and more processes than its quota only take turns."""
    if not on_cpu or not hasattr(os, "fork"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroups, membership)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def cpu_quota(cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> Optional[float]:
    """The CPUs this process's cgroup may use (quota / period), the least along its path up to
    the root of the hierarchy (a parent's limit holds for its children); None without a limit.
    `membership` (/proc/self/cgroup) names the cgroup: "0::/path" on cgroup v2, whose limit is
    cpu.max ("200000 100000": 2 CPUs, "max 100000": none); "N:cpu,cpuacct:/path" on v1, whose
    limit is cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us. In a container the path may
    name the host's view of it, which the container does not see: its own root then holds the
    limit, so a folder that is not there is skipped."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3 or (fields[1] and "cpu" not in fields[1].split(",")):
            continue
        v2, base = not fields[1], cgroups / fields[1]  # v1: the controller's hierarchy, mounted by its name
        folder = base / fields[2].lstrip("/")
        for above in (folder, *folder.parents):
            quota = _quota(above, v2)
            if quota is not None:
                quotas.append(quota)
            if above == base:
                break
    return min(quotas, default=None)


def _quota(folder: Path, v2: bool) -> Optional[float]:
    """The CPU limit one cgroup folder sets, None for none (or none to be read)."""
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()
        else:
            quota, period = ((folder / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


@contextmanager
def forked_workers(
    count: int, serve: Callable[[], None], stop: Callable[[], None], warn: Callable[[str], None]
) -> Iterator[list[int]]:
    """`count` forked processes running `serve()` while the block runs; yields their pids. In a
    worker, `stop()` is called from a thread once the parent is gone; `serve` must then return
    within STOP_SECONDS. A worker that exits with an error while the block runs is reported with
    `warn`. On leaving the block the workers are told to stop and reaped."""
    if count and not hasattr(os, "fork"):
        raise BadOption(f"--workers {count + 1}: this system cannot fork processes; use --workers 1")
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
                _work(read_end, write_end, serve, stop)
            pids.append(pid)
        running = list(pids)
        previous = signal.signal(signal.SIGCHLD, lambda signum, frame: _report_failed(running, warn))
        try:
            yield pids
        finally:
            signal.signal(signal.SIGCHLD, previous)
    finally:
        os.close(write_end)  # every worker sees the parent leave and stops
        os.close(read_end)
        _reap(pids)


def _work(read_end: int, write_end: int, serve: Callable[[], None], stop: Callable[[], None]) -> NoReturn:
    """A worker's life: serve until stopped, then leave without running the parent's code."""
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


def _stop_without_parent(read_end: int, stop: Callable[[], None]) -> None:
    os.read(read_end, 1)  # returns b"" once no process holds the write end: the parent is gone
    stop()
    time.sleep(STOP_SECONDS)  # a request that never ends (a stalled upload) must not keep the worker
    os._exit(1)


def _report_failed(running: list[int], warn: Callable[[str], None]) -> None:
    """On SIGCHLD: reap the workers that exited and report those that failed (a worker stopped
    by Ctrl-C exits with 0)."""
    for pid in list(running):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if not done:
            continue
        running.remove(pid)
        if os.WIFSIGNALED(status):
            warn(
                f"worker process {pid} was killed ({signal.Signals(os.WTERMSIG(status)).name}); the others go on serving"
            )
        elif os.WEXITSTATUS(status):
            warn(f"worker process {pid} stopped with exit code {os.WEXITSTATUS(status)}; the others go on serving")


def _reap(pids: list[int]) -> None:
    """Wait for the workers to exit; kill those still running after STOP_SECONDS, or at once
    when the wait itself is interrupted (a second Ctrl-C)."""
    deadline = time.monotonic() + STOP_SECONDS
    waiting = set(pids)
    try:
        while waiting and time.monotonic() < deadline:
            for pid in list(waiting):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        waiting.discard(pid)
                except ChildProcessError:  # reaped already, on SIGCHLD
                    waiting.discard(pid)
            time.sleep(0.05)
    finally:
        for pid in waiting:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
