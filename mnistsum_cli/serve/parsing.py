"""Request parsing: a POST /api/predict body (a PNG/JPEG, a multipart form with one image file,
or JSON pixels) into the model's 28 x 28 input and the number, each refusal a RequestError with
its HTTP status. The body is read within MAX_BODY bytes and BODY_SECONDS; a form is parsed in
memory, so `serve` writes no file."""

from __future__ import annotations

import asyncio
import json
from io import BytesIO
from typing import Any, AsyncIterator

import numpy as np
import python_multipart  # noqa: F401 (Starlette parses forms with it, and imports without it)
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from mnistsum_cli.data.images import MIN_CONTRAST, SIZE, image_file_in_mnist_form
from mnistsum_cli.errors import MnistsumError

MAX_BODY = 2 * 1024 * 1024  # bytes of one request: a phone photo as JPEG fits, a stream of junk does not
# A drawing from the page (a few KB) is brought to MNIST form in about 2 ms: on the event loop, cheaper than a
# hand-off to a worker thread (measured in bench/serve_load.py); a larger upload decodes in a worker so it never
# stalls the others.
INLINE_BODY = 64 * 1024
# How long a client may take to send a body (a drawing arrives in milliseconds, 2 MB over a slow Wi-Fi in a few
# seconds), from its headers (then a 408): slow or stalled clients cannot hold the connections. The deadlines of
# the headers and of keep-alive are lifecycle.py's.
BODY_SECONDS = 15
IMAGE_FORMATS = ("PNG", "JPEG")  # the decoders an upload may use
IMAGE_TYPES = ("image/png", "image/jpeg", "application/octet-stream")  # raw image bodies
FORM_TYPE = "multipart/form-data"  # a form upload: one image file and a number field
MAX_FORM_PARTS = 16  # files and fields of a form: it needs two


class RequestError(Exception):
    """A request the app refuses: an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def too_large() -> RequestError:
    """The 413 of a body over MAX_BODY, whether its Content-Length says so or its bytes do."""
    return RequestError(413, f"request body over the limit of {MAX_BODY:,} bytes")


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
    return await upload_in_mnist_form(body), number


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 from its Content-Length or, without one (or a false
    one), as soon as more than MAX_BODY bytes have arrived, and with 408 when it has not all
    arrived BODY_SECONDS after its headers (an upload that stalls must not hold a connection)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise too_large()

    async def capped() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise too_large()
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
    return await upload_in_mnist_form(image), number


async def upload_in_mnist_form(image: bytes) -> np.ndarray:
    """An uploaded image in MNIST form, the model's input: a drawing on the event loop, a larger
    one in a thread (INLINE_BODY)."""
    if len(image) <= INLINE_BODY:
        return image_in_mnist_form(image)
    return await run_in_threadpool(image_in_mnist_form, image)


def image_in_mnist_form(image: bytes) -> np.ndarray:
    """As `predict` reads an image file (data.images.image_file_in_mnist_form); what it cannot read is a 422."""
    try:
        return image_file_in_mnist_form(BytesIO(image), "image", IMAGE_FORMATS)
    except MnistsumError as error:
        raise RequestError(422, str(error)) from None
