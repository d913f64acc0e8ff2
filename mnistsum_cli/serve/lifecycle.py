"""Lifecycle: `mnistsum serve` from start-up to shutdown, the entry point the CLI calls (serve).
It checks what it is asked to serve, loads the model, binds the port (a busy one is a one-line
error), forks the worker processes (workers.py), runs uvicorn with the deadlines that keep slow
or stalled clients from holding the connections, and stops on Ctrl-C or SIGTERM after a grace.

Only this command imports Starlette, uvicorn and python-multipart (the optional `serve` extra).
"""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import TYPE_CHECKING, Any, Callable, Optional

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.serve.app import LOOPBACK, KnownHosts, create_app
from mnistsum_cli.serve.follower import ModelFollower
from mnistsum_cli.serve.logs import LOG_CONFIG
from mnistsum_cli.serve.workers import default_workers, forked_workers
from mnistsum_cli.store.paths import RunDir

if TYPE_CHECKING:  # torch loads only for --runtime torch
    import torch

# How long a client may take (the body's deadline, BODY_SECONDS, is parsing.py's): then its connection is closed,
# so that slow or stalled clients cannot hold them all.
HEADER_SECONDS = 10  # a request's headers, from the connection or from the previous answer
KEEP_ALIVE_SECONDS = 5  # between an answer and the next request's first byte (uvicorn's timeout_keep_alive)
# On Ctrl-C, requests in progress get this long; then they are cancelled (an upload that stalls
# must not hold the stop). A worker starts its own grace when the server has stopped.
GRACE_SECONDS = 3


def with_header_deadline(protocol: type) -> type:
    """uvicorn's HTTP protocol with a deadline for each request's headers: a connection whose
    headers have not all arrived HEADER_SECONDS after it opened, or after the previous answer,
    is closed. uvicorn has none: a client that sends nothing, or a byte now and then, would hold
    its connection for ever (uvicorn's keep-alive timeout ends at the first byte). This relies
    on what uvicorn's protocols (h11 and httptools) share: a new `cycle` once a request's
    headers are in, and on_response_complete after each answer."""

    class HeaderDeadline(protocol):
        header_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle.response_complete:  # no pipelined request began
                self.await_headers()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def await_headers(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(HEADER_SECONDS, self.close_if_still, self.cycle)

        def close_if_still(self, cycle: Any) -> None:
            if self.cycle is cycle and not self.transport.is_closing():  # the headers of a new request make a new cycle
                self.transport.close()

    return HeaderDeadline


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind and listen before the server starts, so that a busy port is a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (socket.gaierror, OSError) as error:
        raise MnistsumError(f"--host {host}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise MnistsumError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def serve(
    folder: RunDir,
    host: str,
    port: int,
    device: Optional[torch.device],
    workers: Optional[int],
    say: Callable[[str], None],
    warn: Callable[[str], None],
    runtime: str = "torch",
) -> None:
    """Serve until Ctrl-C (or SIGTERM) with `workers` processes (None: workers.default_workers);
    every problem before the first request is a MnistsumError. `device` is torch's (None on the
    onnx runtime, which runs on the CPU)."""
    if not folder.root.is_dir():
        raise MnistsumError(f"--artifacts {folder.root}: no such folder (the folder `mnistsum train` wrote)")
    on_cpu = device is None or device.type == "cpu"
    workers = default_workers(on_cpu) if workers is None else workers
    if workers > 1 and not on_cpu:
        raise BadOption(
            f"--workers {workers}: one process per GPU (a GPU answers a request in well under a millisecond)"
        )
    if device is not None and on_cpu:
        import torch

        torch.set_num_threads(1)  # one 28 x 28 image per request: more threads only add hand-offs
    follower = ModelFollower(folder, device, runtime)
    sock = listening_socket(host, port)
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    if host not in LOOPBACK:
        warn(f"listening on {host}: anyone who can reach port {port} can use the model")
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(
        create_app(follower, KnownHosts(host)),
        log_level="warning",
        log_config=LOG_CONFIG,
        access_log=False,
        lifespan="off",
        server_header=False,
        proxy_headers=False,  # nothing stands in front of it: X-Forwarded-* from a client would be believed
        timeout_graceful_shutdown=GRACE_SECONDS,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        http=with_header_deadline(AutoHTTPProtocol),
    )
    server = uvicorn.Server(config)

    def serve_forever() -> None:
        try:
            server.run(sockets=[sock])
        except (KeyboardInterrupt, asyncio.CancelledError):
            pass

    def stop() -> None:
        server.should_exit = True

    # SIGTERM (`kill`, a service manager) stops as Ctrl-C does: uvicorn finishes the requests, then
    # raises it again with this handler, so every process ends through its `finally`
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with forked_workers(workers - 1, serve_forever, stop, warn):  # after the model is loaded: they share it
            say(
                f"serving run {follower.current.run_id} on {runtime} from {folder.root} at http://{shown}:{port}/ "
                f"({workers} worker process{'es' if workers > 1 else ''}; Ctrl-C stops)"
            )
            serve_forever()
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    say("stopped")
