"""`mnistsum serve`: a local page to draw a digit and a JSON API, both answered by the run in
--artifacts.

Only this command imports Starlette, uvicorn and python-multipart (the optional `serve` extra).
The app never writes a file: it reads the static files shipped in the package, the run's model,
evaluations and the plots its manifest lists, and nothing else. A drawing is prepared and run
on the event loop (cheaper than a hand-off to a thread); the cores are used by worker processes
(workers.py), each with its own event loop, its own copy of the model and its own check that
the model is current. Checking and swapping the model happen on the event loop alone (a new
model is read in a thread, then swapped in on the loop), and each request keeps the
ServedModel it started with, so no lock is needed. With `--runtime onnx` the model is the run's
model.onnx on onnxruntime (onnx_runtime.py) and torch is never imported.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
from dataclasses import dataclass
from importlib import resources
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional, Union

import numpy as np
import python_multipart  # noqa: F401 (Starlette parses forms with it, and imports without it)
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Match, Route
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from mnistsum_cli.data.images import MIN_CONTRAST, SIZE, prepare_image
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.serve.workers import default_workers, forked_workers
from mnistsum_cli.store.diskfiles import MAX_PLOT_BYTES, read_file, read_with_status
from mnistsum_cli.store.fingerprints import fingerprint_bytes, now_iso
from mnistsum_cli.store.paths import MODEL_FORMAT, SPLITS, RunDir
from mnistsum_cli.store.schemas import EVALUATION, MODEL_META, ONNX_META, PLOTS_MANIFEST, Schema
from mnistsum_cli.store.transactions import read_consistently, read_json

if TYPE_CHECKING:  # torch loads only for --runtime torch
    import torch

MAX_BODY = 2 * 1024 * 1024  # bytes of one request: a phone photo as JPEG fits, a stream of junk does not
# A drawing from the page (a few KB) is prepared in about 2 ms: on the event loop, cheaper than a hand-off to a
# worker thread (measured in bench/serve_load.py); a larger upload decodes in a worker so it never stalls the others.
INLINE_BODY = 64 * 1024
IMAGE_FORMATS = ("PNG", "JPEG")  # the decoders an upload may use
IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream")  # raw image bodies
FORM_TYPE = "multipart/form-data"  # a form upload: one image file and a number field
MAX_FORM_PARTS = 16  # files and fields of a form: it needs two
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")  # --host values that listen on every address of the machine
HOST_HEADER = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::[0-9]*)?")  # name[:port], [v6 address][:port]
# How long a client may take (a drawing arrives in milliseconds, 2 MB over a slow Wi-Fi in a few
# seconds): then its connection is closed, so that slow or stalled clients cannot hold them all.
HEADER_SECONDS = 10  # a request's headers, from the connection or from the previous answer
BODY_SECONDS = 15  # a request's body, from its headers (then a 408)
KEEP_ALIVE_SECONDS = 5  # between an answer and the next request's first byte (uvicorn's timeout_keep_alive)
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
STATIC_FILES = {  # URL path -> (file in mnistsum_cli/serve/static, media type); nothing else is served from there
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
        },
        "nowhere": {"class": "logging.NullHandler"},
    },
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        # a warning for each malformed form, which its client hears about (a 400) already
        "python_multipart": {"handlers": ["nowhere"], "propagate": False},
    },
}


class RequestError(Exception):
    """A request the app refuses: an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ServedModel:
    model: Any  # an nn.Module on torch's device (runtime torch) or an onnx_runtime.OnnxModel
    meta: dict[str, Any]  # model.safetensors' metadata
    identity: tuple[tuple[int, int, int], ...]  # (inode, size, mtime_ns) of each file read (served_files)
    sha256: str  # as fingerprints.fingerprint_file: what evaluations and the plot manifest record
    loaded_at: str
    runtime: str = "torch"


def file_identity(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def served_files(run: RunDir, runtime: str) -> tuple[os.PathLike, ...]:
    """The files a model is read from: model.safetensors, and model.onnx on the onnx runtime."""
    return (run.model, run.onnx) if runtime == "onnx" else (run.model,)


def read_served_model(run: RunDir, device: Optional[torch.device], runtime: str = "torch") -> ServedModel:
    """Read the run's model as one consistent version: every read of a run by `serve` goes
    through here. It reads as every reader of a run folder does (store.read_consistently: never
    during an unfinished commit); one checked open of each file (a regular file within its
    kind's size cap: diskfiles.read_with_status) + one read sees a whole file, and its identity
    comes from that same open file. On the onnx runtime, model.onnx answers, and only when it is
    the export of that model.safetensors (whose header gives the metadata, read without torch)."""
    files = list(zip(served_files(run, runtime), ((MODEL_META.max_bytes, "train"), (ONNX_META.max_bytes, "export"))))

    def read() -> tuple[tuple[tuple[int, int, int], ...], list[bytes]]:
        identities, contents = [], []
        for path, (max_bytes, stage) in files:
            status, data = read_with_status(path, max_bytes, stage)
            identities.append(file_identity(status))
            contents.append(data)
        return tuple(identities), contents

    identity, contents = read_consistently(run.root, read)
    data, sha256 = contents[0], fingerprint_bytes(contents[0])
    if runtime == "onnx":
        from mnistsum_cli.evaluation.onnx_runtime import current_onnx_model
        from mnistsum_cli.store.tensorfiles import decode_safetensors

        _, header = decode_safetensors(data, run.model, "train", MODEL_FORMAT, metadata_only=True)  # without torch
        meta = MODEL_META.check(header, run.model)
        model = current_onnx_model(contents[1], sha256, run, threads=1)
    else:
        from mnistsum_cli.training.checkpoint import load_model_bytes

        model, meta = load_model_bytes(data, run.model, device)
    return ServedModel(model, meta, identity, sha256, now_iso(), runtime)


def served_probabilities(
    served: ServedModel, images: np.ndarray, numbers: list[int], device: Optional[torch.device]
) -> tuple[Any, Any]:
    """Both heads' probabilities for uint8 images [N, 28, 28]: a tensor or an array each, by runtime."""
    if served.runtime == "onnx":
        return served.model.probabilities(images, np.array(numbers, dtype=np.int64))
    import torch

    from mnistsum_cli.training.inference import head_probabilities

    return head_probabilities(served.model, torch.from_numpy(images), torch.tensor(numbers), device)


class ModelFollower:
    """The model that answers: the run's current model (served_files), checked by a stat on each
    request. A new file is loaded once, in a thread: the read waits while a commit of the folder
    is unfinished (store.read_consistently), and meanwhile the event loop answers the other
    requests (/healthz at once). A file that cannot be loaded leaves the previous model serving,
    with the reason in `problem` (until the file changes again)."""

    def __init__(self, run: RunDir, device: Optional[torch.device], runtime: str = "torch") -> None:
        self.run, self.device, self.runtime = run, device, runtime
        self.current = read_served_model(run, device, runtime)
        self.seen: Optional[tuple[tuple[int, int, int], ...]] = self.current.identity
        self.problem: Optional[str] = None
        self.loading: Optional[asyncio.Task] = None

    def refresh(self) -> Optional[asyncio.Task]:
        """Start loading the files if they changed since they were last looked at; the load under
        way, if any (one at a time)."""
        if self.loading is None:
            try:
                identity = tuple(file_identity(os.stat(path)) for path in served_files(self.run, self.runtime))
            except OSError:
                identity = None
            if identity != self.seen:
                self.seen = identity
                self.loading = asyncio.get_running_loop().create_task(self._load())
        return self.loading

    async def get(self) -> ServedModel:
        """The current model, after the load that a change of the files started, if any."""
        loading = self.refresh()
        if loading is not None:
            await asyncio.shield(loading)  # a client that leaves does not cancel the load others wait for
        return self.current

    async def _load(self) -> None:
        try:
            served = await run_in_threadpool(read_served_model, self.run, self.device, self.runtime)
        except Exception as error:  # whatever it is, the previous model serves on and `problem` says why
            reason = str(error) if isinstance(error, MnistsumError) else f"{self.run.model}: cannot load it ({error!r})"
            self.problem = f"{reason}; still serving run {self.current.meta.get('run_id')}"
        else:
            self.current, self.seen, self.problem = served, served.identity, None
        finally:
            self.loading = None


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
        "runtime": served.runtime,
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
    one), as soon as more than MAX_BODY bytes have arrived, and with 408 when it has not all
    arrived BODY_SECONDS after its headers (an upload that stalls must not hold a connection)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise RequestError(413, f"request body over the limit of {MAX_BODY:,} bytes")

    async def capped() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise RequestError(413, f"request body over the limit of {MAX_BODY:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(capped(), BODY_SECONDS)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {BODY_SECONDS} s") from None


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
    except (TypeError, ValueError, OverflowError, RecursionError):  # OverflowError: an integer past float64
        raise RequestError(400, "pixels must be 28 rows of 28 numbers 0-255") from None
    if pixels.shape != (SIZE, SIZE) or not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
        raise RequestError(400, "pixels must be 28 rows of 28 numbers 0-255")
    if pixels.max() - pixels.min() < MIN_CONTRAST * 255:
        raise RequestError(422, "no digit found: the image is blank")
    return np.round(pixels).astype(np.uint8)


async def predict_input(request: Request) -> tuple[np.ndarray, int]:
    """The 28 x 28 model input and the number of a POST /api/predict."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in IMAGE_TYPES + (FORM_TYPE, "application/json"):
        raise RequestError(
            415,
            "send a PNG/JPEG body (?number=N), a form with one image file and a number field, "
            'or JSON {"number": N, "pixels": 28 x 28}',
        )
    body = await read_body(request)
    if media_type == FORM_TYPE:
        return await form_input(request.headers, body)
    if media_type == "application/json":
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the body is not valid JSON") from None
        except RecursionError:
            raise RequestError(400, "the JSON body is nested too deep") from None
        if not isinstance(fields, dict):
            raise RequestError(400, "the JSON body must be an object with number and pixels")
        number = parse_number(fields.get("number"))
        return parse_pixels(fields.get("pixels")), number
    number = parse_number(request.query_params.get("number"))
    if not body:
        raise RequestError(400, "missing image: the request body is empty")
    return await prepared_upload(body), number


class InMemoryParts(MultiPartParser):
    """Starlette's multipart parser, keeping each file in memory (Starlette's spools one over
    1 MB to a temporary file): `serve` writes no file, and the whole body, at most MAX_BODY, is
    in memory already."""

    spool_max_size = MAX_BODY


async def form_input(headers: Headers, body: bytes) -> tuple[np.ndarray, int]:
    """The model input and the number of a form upload (`curl -F image=@seven.png -F number=5`,
    a browser's FormData): exactly one file field, whatever its name, and a `number` field."""

    async def whole() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await InMemoryParts(headers, whole(), max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS).parse()
    except MultiPartException as error:
        raise RequestError(400, f"not a valid multipart/form-data body: {error.message}") from None
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if len(files) != 1:
        raise RequestError(
            400,
            f"send one image file in the form, not {len(files)}" if files else "missing image: the form has no file",
        )
    number = parse_number(form.get("number"))
    image = files[0].file.read()  # from memory (InMemoryParts)
    if not image:
        raise RequestError(400, "missing image: the file in the form is empty")
    return await prepared_upload(image), number


async def prepared_upload(image: bytes) -> np.ndarray:
    """An uploaded image as the model's input: a drawing on the event loop, a larger one in a
    thread (INLINE_BODY)."""
    if len(image) <= INLINE_BODY:
        return prepared_image(image)
    return await run_in_threadpool(prepared_image, image)


def prepared_image(image: bytes) -> np.ndarray:
    try:
        return prepare_image(BytesIO(image), "image", IMAGE_FORMATS)
    except MnistsumError as error:
        raise RequestError(422, str(error)) from None


def model_answers(
    served: ServedModel, images: list[np.ndarray], numbers: list[int], device: Optional[torch.device]
) -> list[Union[tuple[list, list], RequestError]]:
    """The one place `serve` runs a model, on either runtime (served_probabilities): for each
    28 x 28 image and its number, the digit head's 10 and the sum head's 19 probabilities, or the
    error that answers it when they are not all numbers (a model with NaN weights answers NaN,
    and JSON has no NaN)."""
    digit, total = served_probabilities(served, np.stack(images), numbers, device)
    return [
        (digit_probs, sum_probs)
        if all(map(math.isfinite, digit_probs + sum_probs))
        else RequestError(
            500, f"the model of run {served.meta.get('run_id')} answered NaN, not probabilities: train it again"
        )
        for digit_probs, sum_probs in zip(digit.tolist(), total.tolist())  # on a GPU, its errors surface here
    ]


class Batches:
    """One forward pass for the predictions asked for in one turn of the event loop: requests that
    arrive together (several clients) share it. On the CPU a batch of 8 of the lean model costs
    0.9 ms against 0.36 ms for one image (measured in-process), and a lone request waits for
    nothing: its batch runs as soon as the loop has started the requests already received."""

    def __init__(self, device: Optional[torch.device]) -> None:
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
                    answers = model_answers(
                        served, [image for image, _, _ in batch], [n for _, n, _ in batch], self.device
                    )
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


def create_app(follower: ModelFollower, hosts: "KnownHosts") -> "SecurityHeaders":
    """The ASGI app of `serve`, answering with the follower's model the requests whose Host
    header `hosts` knows."""
    run, device = follower.run, follower.device
    static = {
        path: (resources.files("mnistsum_cli.serve").joinpath("static", name).read_bytes(), media)
        for path, (name, media) in STATIC_FILES.items()
    }

    batches = Batches(device)

    async def page(request: Request) -> Response:
        content, media_type = static[request.url.path]
        return Response(content, media_type=media_type)

    async def predict(request: Request) -> JSONResponse:
        image, number = await predict_input(request)
        served = await follower.get()
        problem = follower.problem  # as they were when the request came
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
        served = await follower.get()
        return JSONResponse(run_card(run, served, follower.problem))

    async def healthz(request: Request) -> JSONResponse:
        follower.refresh()  # a probe never waits for a load: it says what serves now
        served = follower.current
        return JSONResponse({"status": "ok", "run_id": served.meta.get("run_id"), "problem": follower.problem})

    async def plot(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in listed_plots(run, await follower.get()):
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
        # the rest of a body too large or too slow is not read: the connection cannot carry another request
        headers = {"Connection": "close"} if status in (408, 413) else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def gone(request: Request, error: Exception) -> Response:
        """A client that went away while its request was read: nobody reads the answer, and it
        is nothing to log (uvicorn logs each exception handled as a 500)."""
        return Response(status_code=400)

    routes = [Route(path, page) for path in STATIC_FILES] + [
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/model", model),
        Route("/healthz", healthz),
        Route("/plots/{name}", plot),
    ]

    async def slash_redirect(scope: dict, receive: Callable, send: Callable) -> None:
        """What Starlette's own slash redirect does (`/healthz/` -> `/healthz`), with a relative
        Location: Starlette writes an absolute one from the Host header, which a client chooses."""
        path = scope["path"]
        toggled = path.rstrip("/") if path.endswith("/") else path + "/"
        if path != "/" and any(route.matches({**scope, "path": toggled})[0] != Match.NONE for route in routes):
            query = scope["query_string"].decode("latin-1")
            await RedirectResponse(toggled + (f"?{query}" if query else ""))(scope, receive, send)
            return
        raise HTTPException(404)

    app = Starlette(
        routes=routes,
        exception_handlers={
            Exception: refused,
            HTTPException: refused,
            RequestError: refused,
            ClientDisconnect: gone,
        },
    )
    app.router.redirect_slashes, app.router.default = False, slash_redirect
    return SecurityHeaders(hosts.guarding(app))


class KnownHosts:
    """The Host header names `serve` answers: the loopback names, and the --host it listens on
    (with any port: an ssh tunnel or a port forward changes it). Others get a 400, so that a
    page of another site cannot reach the server through a name of its own that it points at
    127.0.0.1 (DNS rebinding). Listening on every address (0.0.0.0, ::), any IP address is
    answered too, and the machine's own names: a browser sends an IP address as the Host only
    when it went to that address itself, never for another site's page."""

    def __init__(self, host: str) -> None:
        self.any_address = host in ANY_ADDRESS
        names = {*LOOPBACK, host, *((socket.gethostname(), socket.getfqdn()) if self.any_address else ())}
        self.names = frozenset(f"[{name.lower()}]" if ":" in name else name.lower() for name in names if name)

    def knows(self, header: str) -> bool:
        """Whether a Host header (`name`, `name:port`, `[v6]:port`) names this server."""
        match = HOST_HEADER.fullmatch(header)
        if match is None:
            return False
        name = match.group(1).lower()
        return name in self.names or (self.any_address and _is_address(name.strip("[]")))

    def guarding(self, app: Callable) -> Callable:
        """`app` behind the check: a request with an unknown Host gets a 400 and one line."""

        async def guarded(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] == "http" and not self.knows(
                next((value for name, value in scope["headers"] if name == b"host"), b"").decode("latin-1")
            ):
                refusal = {"error": "unknown Host header: open the address `mnistsum serve` printed"}
                await JSONResponse(refusal, status_code=400)(scope, receive, send)
                return
            await app(scope, receive, send)

        return guarded


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


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
    run: RunDir,
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
    if not run.root.is_dir():
        raise MnistsumError(f"--artifacts {run.root}: no such folder (the folder `mnistsum train` wrote)")
    on_cpu = device is None or device.type == "cpu"
    workers = default_workers(on_cpu) if workers is None else workers
    if workers > 1 and not on_cpu:
        raise BadOption(
            f"--workers {workers}: one process per GPU (a GPU answers a request in well under a millisecond)"
        )
    if device is not None and on_cpu:
        import torch

        torch.set_num_threads(1)  # one 28 x 28 image per request: more threads only add hand-offs
    follower = ModelFollower(run, device, runtime)
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
                f"serving run {follower.current.meta.get('run_id')} on {runtime} from {run.root} at http://{shown}:{port}/ "
                f"({workers} worker process{'es' if workers > 1 else ''}; Ctrl-C stops)"
            )
            serve_forever()
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    say("stopped")
