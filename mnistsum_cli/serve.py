"""`mnistsum serve`: a local page to draw a digit and a JSON API, both answered by the run in
--artifacts.

Only this command imports Starlette and uvicorn (the optional `serve` extra). The app never
writes a file: it reads the static files shipped in the package, the run's model, evaluations
and the plots its manifest lists, and nothing else. A drawing is prepared and run on the event
loop (cheaper than a hand-off to a thread); the cores are used by worker processes
(workers.py), each with its own event loop, its own copy of the model and its own check that
the model is current. Checking and swapping the model happen on the event loop alone, and each
request keeps the ServedModel it started with, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass
from importlib import resources
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from torch import nn

from mnistsum_cli.checkpoint import load_model_bytes
from mnistsum_cli.diskfiles import MAX_PLOT_BYTES, read_file, read_with_status
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.fingerprints import now_iso
from mnistsum_cli.paths import SPLITS, RunDir
from mnistsum_cli.predict import MIN_CONTRAST, SIZE, head_probabilities, prepare_image
from mnistsum_cli.schemas import EVALUATION, MODEL_META, PLOTS_MANIFEST, Schema
from mnistsum_cli.store import read_consistently, read_json
from mnistsum_cli.workers import default_workers, forked_workers

MAX_BODY = 2 * 1024 * 1024  # bytes of one request: a phone photo as JPEG fits, a stream of junk does not
# A drawing from the page (a few KB) is prepared in about 2 ms: on the event loop, cheaper than a hand-off to a
# worker thread (measured in bench/serve_load.py); a larger upload decodes in a worker so it never stalls the others.
INLINE_BODY = 64 * 1024
IMAGE_FORMATS = ("PNG", "JPEG")  # the decoders an upload may use
IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream")  # raw image bodies
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# On Ctrl-C, requests in progress get this long; then they are cancelled (an upload that stalls
# must not hold the stop). A worker starts its own grace when the server has stopped.
GRACE_SECONDS = 3
SECURITY_HEADERS = {
    # every byte comes from this app: no CDN, no fonts, no analytics, no inline script or style
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC_FILES = {  # URL path -> (file in mnistsum_cli/static, media type); nothing else is served from there
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


class OneLine(logging.Formatter):
    """uvicorn's log records as one line each, with the exception's type and message and no
    traceback: a bug met by a request is a 500 for its client and one line here."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().strip()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message = f"{message}: {type(error).__name__}" + (f": {error}" if str(error) else "")
        return f"{record.levelname.lower()}: {message}"


class NotCancelled(logging.Filter):
    """Drops the record of each request cancelled at the end of the grace on Ctrl-C: uvicorn's
    line before them says how many it cancelled."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


LOG_CONFIG = {  # what uvicorn logs (warnings and errors; no access log), through OneLine to stderr
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"one_line": {"()": OneLine}},
    "filters": {"not_cancelled": {"()": NotCancelled}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "one_line",
            "filters": ["not_cancelled"],
            "stream": "ext://sys.stderr",
        }
    },
    "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False}},
}


class RequestError(Exception):
    """A request the app refuses: an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ServedModel:
    model: nn.Module
    meta: dict[str, Any]
    identity: tuple[int, int, int]  # (inode, size, mtime_ns) of the file that was read
    sha256: str  # as fingerprints.fingerprint_file: what evaluations and the plot manifest record
    loaded_at: str


def file_identity(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def read_served_model(run: RunDir, device: torch.device) -> ServedModel:
    """Read the run's model as one consistent version: every read of a run by `serve` goes
    through here. It reads as every reader of a run folder does (store.read_consistently: never
    during an unfinished commit); one checked open (a regular file within the model's size cap:
    diskfiles.read_with_status) + one read sees a whole file, and its identity comes from that same open file."""

    status, data = read_consistently(run.root, lambda: read_with_status(run.model, MODEL_META.max_bytes, "train"))
    identity = file_identity(status)
    model, meta = load_model_bytes(data, run.model, device)
    return ServedModel(model, meta, identity, hashlib.sha256(data).hexdigest()[:16], now_iso())


class ModelFollower:
    """The model that answers: the run's current model.safetensors, checked by a stat on each
    request. A new file is loaded once; one that cannot be read leaves the previous model
    serving, with the reason in `problem` (until the file changes again)."""

    def __init__(self, run: RunDir, device: torch.device) -> None:
        self.run, self.device = run, device
        self.current = read_served_model(run, device)
        self.seen: Optional[tuple[int, int, int]] = self.current.identity
        self.problem: Optional[str] = None

    def get(self) -> ServedModel:
        try:
            identity: Optional[tuple[int, int, int]] = file_identity(os.stat(self.run.model))
        except OSError:
            identity = None
        if identity != self.seen:
            self.seen = identity
            try:
                self.current = read_served_model(self.run, self.device)
                self.seen, self.problem = self.current.identity, None
            except MnistsumError as error:
                self.problem = f"{error}; still serving run {self.current.meta.get('run_id')}"
        return self.current


def run_card(run: RunDir, served: ServedModel, problem: Optional[str]) -> dict[str, Any]:
    """What GET /api/model says: the run, its evaluations and plots when they were made from
    this very model (by fingerprint), and why a newer model is not serving, if so."""
    meta = served.meta
    evaluations = {}
    for split in SPLITS:
        metrics = _json_or_none(run.evaluation(split), EVALUATION)
        if isinstance(metrics, dict) and (metrics.get("model") or {}).get("sha256") == served.sha256:
            evaluations[split] = {
                key: metrics.get(key) for key in ("rows", "digit_accuracy", "sum_accuracy", "consistency")
            }
    return {
        "run_id": meta.get("run_id"),
        "arch": meta.get("arch"),
        "epoch": meta.get("epoch"),
        "dataset_id": meta.get("dataset_id"),
        "sha256": served.sha256,
        "loaded_at": served.loaded_at,
        "training_val": {
            "digit_accuracy": meta.get("val_digit_accuracy"),
            "sum_accuracy": meta.get("val_sum_accuracy"),
        },
        "evaluations": evaluations,
        "plots": [f"/plots/{name}" for name in listed_plots(run, served)],
        "problem": problem,
    }


def listed_plots(run: RunDir, served: ServedModel) -> list[str]:
    """The plot file names plots/manifest.json lists, when it was drawn for this model; the only
    files of the run the app serves."""
    manifest = _json_or_none(run.plots_manifest, PLOTS_MANIFEST)
    if not isinstance(manifest, dict) or (manifest.get("inputs") or {}).get("model") != served.sha256:
        return []
    files = manifest.get("files")
    return [
        name
        for name in (files if isinstance(files, list) else [])
        if isinstance(name, str)
        and name.endswith(".png")
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
    ]


def _json_or_none(path: Path, kind: Schema) -> Any:
    """The JSON in `path`, read as a checked file of `kind` (store.read_json), or None when it
    cannot be read: the page shows what it can."""
    try:
        return read_json(path, kind.stage, kind.max_bytes)
    except MnistsumError:
        return None


# --------------------------------------------------------------------------- requests


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 from its Content-Length or, without one (or a false
    one), as soon as more than MAX_BODY bytes have arrived."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise RequestError(413, f"request body over the limit of {MAX_BODY:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise RequestError(413, f"request body over the limit of {MAX_BODY:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_number(value: Any) -> int:
    if value is None:
        raise RequestError(400, "missing field: number (0-9)")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
        raise RequestError(400, f"number must be an integer 0-9, got {str(value)[:20]!r}")
    return value


def parse_pixels(value: Any) -> np.ndarray:
    """A 28 x 28 array already in MNIST form (white on black, 0-255): the model's input as is."""
    if value is None:
        raise RequestError(400, "missing field: pixels (28 x 28 numbers 0-255), or send a PNG/JPEG body")
    try:
        pixels = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise RequestError(400, "pixels must be 28 rows of 28 numbers 0-255") from None
    if pixels.shape != (SIZE, SIZE) or not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
        raise RequestError(400, "pixels must be 28 rows of 28 numbers 0-255")
    if pixels.max() - pixels.min() < MIN_CONTRAST * 255:
        raise RequestError(422, "no digit found: the image is blank")
    return np.round(pixels).astype(np.uint8)


async def predict_input(request: Request) -> tuple[np.ndarray, int]:
    """The 28 x 28 model input and the number of a POST /api/predict."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in IMAGE_TYPES + ("application/json",):
        raise RequestError(415, 'send a PNG/JPEG body (?number=N) or JSON {"number": N, "pixels": 28 x 28}')
    body = await read_body(request)
    if media_type == "application/json":
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise RequestError(400, "the JSON body must be an object with number and pixels")
        number = parse_number(fields.get("number"))
        return parse_pixels(fields.get("pixels")), number
    number = parse_number(request.query_params.get("number"))
    if not body:
        raise RequestError(400, "missing image: the request body is empty")
    if len(body) <= INLINE_BODY:
        return prepared_upload(body), number
    return await run_in_threadpool(prepared_upload, body), number


def prepared_upload(body: bytes) -> np.ndarray:
    try:
        return prepare_image(BytesIO(body), "image", IMAGE_FORMATS)
    except MnistsumError as error:
        raise RequestError(422, str(error)) from None


class Batches:
    """One forward pass for the predictions asked for in one turn of the event loop: requests that
    arrive together (several clients) share it. On the CPU a batch of 8 of the lean model costs
    0.9 ms against 0.36 ms for one image (measured in-process), and a lone request waits for
    nothing: its batch runs as soon as the loop has started the requests already received."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.waiting: list[tuple[ServedModel, np.ndarray, int, asyncio.Future]] = []

    async def probabilities(self, served: ServedModel, image: np.ndarray, number: int) -> tuple[list, list]:
        """The digit head's 10 and the sum head's 19 probabilities for one 28 x 28 image."""
        loop = asyncio.get_running_loop()
        if not self.waiting:
            loop.call_soon(self.run)  # after the request tasks already scheduled in this turn
        future = loop.create_future()
        self.waiting.append((served, image, number, future))
        return await future

    def run(self) -> None:
        waiting, self.waiting = self.waiting, []
        try:
            for served in {id(served): served for served, *_ in waiting}.values():  # one model, unless it just changed
                batch = [(image, number, future) for model, image, number, future in waiting if model is served]
                try:
                    digit, total = head_probabilities(
                        served.model,
                        torch.from_numpy(np.stack([image for image, _, _ in batch])),
                        torch.tensor([number for _, number, _ in batch]),
                        self.device,
                    )
                    answers = list(zip(digit.tolist(), total.tolist()))  # on a GPU, its errors surface here
                except Exception as error:  # answered as a 500 by each request, the server goes on
                    answers = [error] * len(batch)
                for (_, _, future), answer in zip(batch, answers):
                    if future.done():  # the client went away
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:  # whatever went wrong above, no request waits forever
            for *_, future in waiting:
                if not future.done():
                    future.set_exception(RuntimeError("the batch did not run"))


# --------------------------------------------------------------------------- the app


def create_app(follower: ModelFollower) -> "SecurityHeaders":
    """The ASGI app of `serve`, answering with the follower's model."""
    run, device = follower.run, follower.device
    static = {
        path: (resources.files("mnistsum_cli").joinpath("static", name).read_bytes(), media)
        for path, (name, media) in STATIC_FILES.items()
    }

    batches = Batches(device)

    async def page(request: Request) -> Response:
        content, media_type = static[request.url.path]
        return Response(content, media_type=media_type)

    async def predict(request: Request) -> JSONResponse:
        image, number = await predict_input(request)
        served, problem = follower.get(), follower.problem  # as they were when the request came
        digit_probs, sum_probs = await batches.probabilities(served, image, number)
        return JSONResponse(
            {
                "digit": int(np.argmax(digit_probs)),
                "number": number,
                "sum": int(np.argmax(sum_probs)),
                "digit_probabilities": digit_probs,
                "sum_probabilities": sum_probs,
                "input": image.tolist(),
                "run_id": served.meta.get("run_id"),
                "problem": problem,
            }
        )

    async def model(request: Request) -> JSONResponse:
        served = follower.get()
        return JSONResponse(run_card(run, served, follower.problem))

    async def healthz(request: Request) -> JSONResponse:
        served = follower.get()
        return JSONResponse({"status": "ok", "run_id": served.meta.get("run_id"), "problem": follower.problem})

    async def plot(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in listed_plots(run, follower.get()):
            raise RequestError(404, "no such plot in this run's plots/manifest.json")
        try:
            content = read_file(run.plots / name, MAX_PLOT_BYTES, "plot")
        except MnistsumError:
            raise RequestError(404, f"plot {name} is listed but cannot be read: rerun `mnistsum plot`") from None
        return Response(content, media_type="image/png")

    async def refused(request: Request, error: Exception) -> JSONResponse:
        if isinstance(error, RequestError):
            status, message = error.status, str(error)
        elif isinstance(error, HTTPException):
            status, message = (
                error.status_code,
                {404: "not found", 405: "method not allowed"}.get(error.status_code, str(error.detail)),
            )
        else:  # a bug: the client gets one line, the server keeps serving
            status, message = 500, f"internal error ({type(error).__name__})"
        return JSONResponse({"error": message}, status_code=status)

    routes = [Route(path, page) for path in STATIC_FILES] + [
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/model", model),
        Route("/healthz", healthz),
        Route("/plots/{name}", plot),
    ]
    return SecurityHeaders(
        Starlette(routes=routes, exception_handlers={Exception: refused, HTTPException: refused, RequestError: refused})
    )


class SecurityHeaders:
    """ASGI wrapper adding SECURITY_HEADERS to every response, error responses included."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.headers = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_secured)


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
    run: RunDir,
    host: str,
    port: int,
    device: torch.device,
    workers: Optional[int],
    say: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """Serve until Ctrl-C (or SIGTERM) with `workers` processes (None: workers.default_workers);
    every problem before the first request is a MnistsumError."""
    if not run.root.is_dir():
        raise MnistsumError(f"--artifacts {run.root}: no such folder (the folder `mnistsum train` wrote)")
    workers = default_workers(device.type == "cpu") if workers is None else workers
    if workers > 1 and device.type != "cpu":
        raise BadOption(
            f"--workers {workers}: one process per GPU (a GPU answers a request in well under a millisecond)"
        )
    if device.type == "cpu":
        torch.set_num_threads(1)  # one 28 x 28 image per request: more threads only add hand-offs
    follower = ModelFollower(run, device)
    sock = listening_socket(host, port)
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    if host not in LOOPBACK:
        warn(f"listening on {host}: anyone who can reach port {port} can use the model")
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(
        create_app(follower),
        log_level="warning",
        log_config=LOG_CONFIG,
        access_log=False,
        lifespan="off",
        server_header=False,
        proxy_headers=False,  # nothing stands in front of it: X-Forwarded-* from a client would be believed
        timeout_graceful_shutdown=GRACE_SECONDS,
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
                f"serving run {follower.current.meta.get('run_id')} from {run.root} at http://{shown}:{port}/ "
                f"({workers} worker process{'es' if workers > 1 else ''}; Ctrl-C stops)"
            )
            serve_forever()
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    say("stopped")
