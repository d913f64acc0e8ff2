"""A throw-away PostgreSQL server for the sweep tests and bench/sweep_bench.py: its own cluster in a
temp folder, reachable on a Unix socket only (no TCP), run as `nobody` when we are root
(PostgreSQL refuses to run as root), stopped and removed at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

DATABASE, USER = "sweeps", "mnistsum"


def postgres_binaries() -> Optional[Path]:
    """The folder of initdb/postgres/pg_ctl: Debian's /usr/lib/postgresql/<version>/bin (the newest),
    else wherever `postgres` is on the PATH; None when PostgreSQL is not installed."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    found = shutil.which("postgres")
    return Path(found).parent if found else None


@contextmanager
def postgres_server(binaries: Path) -> Iterator[str]:
    """Start a server; yields an SQLAlchemy URL (psycopg 3) of an empty database on it."""
    root = Path(tempfile.mkdtemp(prefix="mnistsum-pg-"))  # short: a Unix socket path stays under 108 bytes
    os.chmod(root, 0o755)
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        for folder in (root, sockets):
            shutil.chown(folder, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]

    def run(*command: object) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *map(str, command)], capture_output=True, text=True, timeout=120)

    server = None
    try:
        init = run(binaries / "initdb", "-D", data, "-U", USER, "--auth=trust")
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()}")
        options = ["-k", str(sockets), "-c", "listen_addresses=", "-c", "fsync=off"]
        server = subprocess.Popen(
            [*as_user, str(binaries / "postgres"), "-D", str(data), *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not list(sockets.glob(".s.PGSQL.*")) and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if server.poll() is not None:
            raise RuntimeError(f"postgres did not start: {server.stderr.read().strip()}")
        created = run(binaries / "createdb", "-h", sockets, "-U", USER, DATABASE)
        if created.returncode != 0:
            raise RuntimeError(f"createdb failed: {created.stderr.strip()}")
        yield f"postgresql+psycopg://{USER}@/{DATABASE}?host={sockets}"
    finally:
        if server is not None:
            run(binaries / "pg_ctl", "stop", "-D", data, "-m", "fast")  # runuser passes no signal on
            server.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
