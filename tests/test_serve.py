"""`mnistsum serve` without a browser: every route and every refused request through Starlette's
test client, the model following the artifacts folder, and the command's own errors and Ctrl-C."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import assert_one_line_error, model_metadata, publish_model, save_model, snapshot
from mnistsum_cli.data.images import image_file_in_mnist_form
from mnistsum_cli.errors import BadOption
from mnistsum_cli.store.fingerprints import fingerprint_file
from mnistsum_cli.store.paths import RunDir
from mnistsum_cli.store.schemas import MODEL_META
from mnistsum_cli.store.transactions import commit, write_json
from mnistsum_cli.training import inference
from mnistsum_cli.training.inference import head_probabilities
from mnistsum_cli.training.models import build_model

starlette = pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[dev]'")
from starlette.testclient import TestClient  # noqa: E402 (after the importorskip)

from mnistsum_cli.serve import follower as follower_module  # noqa: E402 (a helper here is named follower)
from mnistsum_cli.serve import lifecycle, logs  # noqa: E402
from mnistsum_cli.serve.app import KnownHosts, create_app  # noqa: E402
from mnistsum_cli.serve.batching import Batches  # noqa: E402
from mnistsum_cli.serve.follower import ModelFollower  # noqa: E402
from mnistsum_cli.serve.lifecycle import GRACE_SECONDS, HEADER_SECONDS, KEEP_ALIVE_SECONDS  # noqa: E402
from mnistsum_cli.serve.parsing import BODY_SECONDS, MAX_BODY  # noqa: E402
from mnistsum_cli.serve.workers import MAX_DEFAULT_WORKERS, default_workers  # noqa: E402
from mnistsum_cli.serve.workers import STOP_SECONDS as SERVE_STOP_SECONDS  # noqa: E402

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def write_model(run: RunDir, run_id: str, seed: int) -> None:
    """An untrained lean model (random weights from `seed`) saved as `train` saves one."""
    torch.manual_seed(seed)
    save_model(run.model, build_model("lean"), model_metadata("lean", run_id, epoch=2))


def write_adding_model(run: RunDir, run_id: str, seed: int) -> None:
    """As write_model, with a sum head that adds (its weights are the addition table), so that
    each answer depends on both the image and the number."""
    torch.manual_seed(seed)
    model = build_model("lean")
    with torch.no_grad():
        table = model.sum_head.mix.weight  # [19 sums, 10 digits x 10 numbers]
        table.zero_()
        for digit in range(10):
            for number in range(10):
                table[digit + number, 10 * digit + number] = 1.0
    save_model(run.model, model, model_metadata("lean", run_id, epoch=2))


_EXPORTS: dict[str, bytes] = {}  # model.onnx of each model.safetensors hash: each model is exported once


def write_export(run: RunDir) -> None:
    """model.onnx of the run's model.safetensors, as `mnistsum export` writes it (without its
    check on a test split: these models were trained on no dataset)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[dev]'")
    from mnistsum_cli.export import export_metadata, onnx_graph
    from mnistsum_cli.training.checkpoint import load_model

    sha = fingerprint_file(run.model, MODEL_META)
    if sha not in _EXPORTS:
        model, meta = load_model(run.model, CPU)
        proto = onnx_graph(model, None, export_metadata(meta, sha))
        proto.metadata_props.add(key="check", value="none (a test)")
        _EXPORTS[sha] = proto.SerializeToString()
    with commit(run.root) as change:
        change.write(run.onnx.name, _EXPORTS[sha])


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "artifacts")
    write_model(run, "run1", seed=0)
    return run


@pytest.fixture(params=["torch", "onnx"])
def runtime(request: pytest.FixtureRequest) -> str:
    """The runtime the `client` serves with: the key API tests run on both."""
    return request.param


def follower(run: RunDir, runtime: str) -> ModelFollower:
    if runtime == "onnx":
        write_export(run)
        return ModelFollower(run, None, "onnx")
    return ModelFollower(run, CPU)


@pytest.fixture
def client(run: RunDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: str) -> Iterator[TestClient]:
    monkeypatch.chdir(tmp_path)
    # one event loop for all its requests, as in the server: a model load may outlive the request that began it
    app = served_app(run, runtime=runtime)
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as client:
        yield client


def served_app(run: RunDir, host: str = "127.0.0.1", runtime: str = "torch"):
    """The app as `serve --host HOST --runtime RUNTIME` runs it."""
    return create_app(follower(run, runtime), KnownHosts(host))


def drawn_seven(size: int = 280, fmt: str = "PNG") -> bytes:
    """Black ink on white, as the page's drawing pad sends it."""
    image = Image.new("L", (size, size), 255)
    ImageDraw.Draw(image).line(
        [(0.3 * size, 0.2 * size), (0.7 * size, 0.2 * size), (0.45 * size, 0.85 * size)], fill=0, width=size // 12
    )
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def expected(run: RunDir, image: np.ndarray, number: int) -> tuple[list[float], list[float]]:
    """What the model answers when called directly, as `predict` calls it."""
    from mnistsum_cli.training.checkpoint import load_model

    model, _ = load_model(run.model, CPU)
    digit, total = head_probabilities(model, torch.from_numpy(image[None]), torch.tensor([number]), CPU)
    return digit[0].tolist(), total[0].tolist()


def assert_refused(response, status: int, words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    assert "\n" not in message and words in message, message


def upload(encoding: str, body: bytes, number: Any = 1, content_type: str = "image/png") -> dict:
    """The arguments of client.post for an image and its number (None: none given), either as
    a raw body with ?number=N or as a form (`curl -F image=@seven.png -F number=5`)."""
    if encoding == "raw":
        query = "" if number is None else f"?number={number}"
        return {"url": f"/api/predict{query}", "content": body, "headers": {"Content-Type": content_type}}
    fields = {} if number is None else {"number": str(number)}
    return {"url": "/api/predict", "files": {"image": ("digit", body, content_type)}, "data": fields}


def raw(path: str, body: bytes, headers: dict) -> dict:
    return {"url": path, "content": body, "headers": headers}


ENCODINGS = ("raw", "form")

# --------------------------------------------------------------------------- routes


def test_page_and_its_files_come_from_the_app_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path, kind in (("/app.js", "javascript"), ("/style.css", "text/css"), ("/favicon.svg", "svg")):
        response = client.get(path)
        assert response.status_code == 200 and kind in response.headers["content-type"], path
        text = response.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a request
        assert "http:" not in text and "https:" not in text, path
    for path in ("/", "/app.js", "/healthz", "/api/model", "/nope"):
        headers = client.get(path).headers
        assert headers["content-security-policy"].startswith("default-src 'self'"), path
        assert headers["x-content-type-options"] == "nosniff", path
    assert "https:" not in page.text and "http:" not in page.text
    for needle in ('id="pad"', 'id="numbers"', 'id="clear"', 'type="file"', 'id="seen"', "28 x 28", "sum is computed"):
        assert needle in page.text, needle


def test_healthz_and_model_card(client: TestClient, run: RunDir, runtime: str) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "run_id": "run1", "problem": None}
    card = client.get("/api/model").json()
    assert (card["run_id"], card["arch"], card["epoch"], card["problem"]) == ("run1", "lean", 2, None)
    assert card["runtime"] == runtime
    assert card["sha256"] == fingerprint_file(run.model, MODEL_META)
    assert card["evaluations"] == {} and card["plots"] == []


def test_card_shows_evaluations_and_plots_of_this_model_only(client: TestClient, run: RunDir) -> None:
    sha = fingerprint_file(run.model, MODEL_META)
    write_json(
        run.evaluation("test"),
        {"rows": 10, "digit_accuracy": 0.9, "sum_accuracy": 0.8, "consistency": 1.0, "model": {"sha256": sha}},
    )
    write_json(
        run.evaluation("val"),
        {"rows": 10, "digit_accuracy": 0.5, "sum_accuracy": 0.5, "model": {"sha256": "another model"}},
    )
    run.plots.mkdir()
    png = drawn_seven(40)
    for name in ("loss.png", "unlisted.png"):
        (run.plots / name).write_bytes(png)
    run.plots_manifest.write_text(
        json.dumps({"inputs": {"model": sha}, "files": ["loss.png", "../config.json", "/etc/passwd"]})
    )
    card = client.get("/api/model").json()
    assert card["evaluations"] == {"test": {"rows": 10, "digit_accuracy": 0.9, "sum_accuracy": 0.8, "consistency": 1.0}}
    assert card["plots"] == ["/plots/loss.png"]
    response = client.get("/plots/loss.png")
    assert response.status_code == 200 and response.content == png and response.headers["content-type"] == "image/png"
    assert_refused(client.get("/plots/unlisted.png"), 404, "manifest")
    run.plots_manifest.write_text(json.dumps({"inputs": {"model": "another model"}, "files": ["loss.png"]}))
    assert client.get("/api/model").json()["plots"] == []
    assert_refused(client.get("/plots/loss.png"), 404, "manifest")


@pytest.mark.parametrize(
    "path",
    [
        "/plots/..%2f..%2fartifacts%2fmodel.safetensors",
        "/plots/%2e%2e/model.safetensors",
        "/plots/%2e%2e%2fconfig.json",
        "/plots/%2Fetc%2Fpasswd",
        "/plots//etc/passwd",
        "/static/../../pyproject.toml",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/app.js/..%2f..%2fserve.py",
        "/etc/passwd",
        "/mnistsum_cli/serve/app.py",
        "/static/app.js",
    ],
)
def test_no_path_reaches_other_files(client: TestClient, run: RunDir, path: str) -> None:
    run.plots.mkdir()
    run.plots_manifest.write_text(
        json.dumps({"inputs": {"model": fingerprint_file(run.model, MODEL_META)}, "files": ["loss.png"]})
    )
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert response.json() == {"error": "not found"} or "manifest" in response.json()["error"]


HOSTS = {  # --host -> (Host headers answered, Host headers refused)
    "127.0.0.1": (
        ["127.0.0.1:8000", "127.0.0.1", "localhost:8000", "LocalHost", "localhost:9999", "[::1]:8000", "[::1]"],
        [
            "evil.example",
            "evil.example:8000",
            "127.0.0.1.evil.example",
            "localhost.evil.example:8000",
            "192.168.1.5",
            "",
            "localhost:80:80",
            "localhost:x",
            "[::1]x",
            "[::2]:8000",
            "0.0.0.0:8000",
        ],
    ),
    "::1": (["[::1]:8000", "[::1]", "localhost"], ["::1", "[::1]]", "evil.example"]),
    "myhost.lan": (["myhost.lan:8000", "MyHost.LAN", "127.0.0.1:8000"], ["other.lan", "192.168.1.5:8000"]),
    "0.0.0.0": (
        ["192.168.1.5:8000", "10.0.0.1", "[fe80::1]:8000", socket.gethostname(), "localhost"],
        ["evil.example:8000", "192.168.1.5.evil.example", "999.1.1.1"],
    ),
}


@pytest.mark.parametrize("listening", list(HOSTS))
def test_only_the_hosts_it_listens_on_are_answered(run: RunDir, tmp_path: Path, listening: str) -> None:
    """A page of another site that points a name of its own at 127.0.0.1 (DNS rebinding) sends
    that name as the Host: it gets a 400, whatever the path."""
    client = TestClient(served_app(run, listening), base_url="http://127.0.0.1:8000", raise_server_exceptions=False)
    answered, refused = HOSTS[listening]
    for host in answered:
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    before = snapshot(tmp_path)
    for host in refused:
        for response in (
            client.get("/healthz", headers={"Host": host}),
            client.get("/api/model", headers={"Host": host}),
            client.post("/api/predict?number=1", content=drawn_seven(), headers={**PNG, "Host": host}),
        ):
            assert_refused(response, 400, "unknown Host header")
            assert response.headers["content-security-policy"].startswith("default-src 'self'")
    assert snapshot(tmp_path) == before


def test_a_slash_redirect_is_relative_and_never_names_the_host(client: TestClient) -> None:
    response = client.get("/healthz/?probe=1", headers={"Host": "localhost:8000"}, follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (307, "/healthz?probe=1")
    response = client.get("/healthz/", headers={"Host": "evil.example:8000"}, follow_redirects=False)
    assert response.status_code == 400 and "location" not in response.headers
    for path in ("//evil.example/", "//evil.example", "/api/nothing/"):
        response = client.get(f"http://127.0.0.1:8000{path}", follow_redirects=False)
        assert response.status_code == 404 and "location" not in response.headers, path


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_predict_png_answers_as_predict_does(client: TestClient, run: RunDir, encoding: str) -> None:
    body = drawn_seven()
    response = client.post(**upload(encoding, body, 4))
    assert response.status_code == 200, response.text
    answer = response.json()
    image = image_file_in_mnist_form(io.BytesIO(body), "seven")
    digit_probs, sum_probs = expected(run, image, 4)
    assert answer["input"] == image.tolist()
    assert np.allclose(answer["digit_probabilities"], digit_probs, atol=1e-6)
    assert np.allclose(answer["sum_probabilities"], sum_probs, atol=1e-6)
    assert answer["digit"] == int(np.argmax(digit_probs)) and answer["sum"] == int(np.argmax(sum_probs))
    assert (answer["number"], answer["run_id"], answer["problem"]) == (4, "run1", None)
    assert len(answer["digit_probabilities"]) == 10 and len(answer["sum_probabilities"]) == 19


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_predict_jpeg(client: TestClient, encoding: str) -> None:
    jpeg = drawn_seven(fmt="JPEG")
    answer = client.post(**upload(encoding, jpeg, 0, "image/jpeg")).json()
    assert answer["input"] == image_file_in_mnist_form(io.BytesIO(jpeg), "jpeg").tolist() and answer["number"] == 0


def test_predict_pixels(client: TestClient, run: RunDir) -> None:
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[6:22, 13:16] = 255
    response = client.post("/api/predict", json={"number": 9, "pixels": pixels.tolist()})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["input"] == pixels.tolist() and answer["number"] == 9
    assert np.allclose(answer["digit_probabilities"], expected(run, pixels, 9)[0], atol=1e-6)


# --------------------------------------------------------------------------- requests served together


def predict_scope(number: int, *headers: tuple[bytes, bytes]) -> dict:
    """The ASGI scope of POST /api/predict?number=N with a PNG body and these other headers."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/predict",
        "raw_path": b"/api/predict",
        "query_string": f"number={number}".encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"image/png"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }


async def asgi_post(app, body: bytes, number: int) -> tuple[int, dict]:
    """POST /api/predict straight through the ASGI app (several can run at once on one event
    loop, which the test client cannot do); the status and the JSON answer."""
    scope = predict_scope(number, (b"content-length", str(len(body)).encode()))
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop() if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    except Exception:  # Starlette raises it again after its 500 answer, for the server's log
        assert sent and sent[0]["status"] == 500
    return sent[0]["status"], json.loads(b"".join(message.get("body", b"") for message in sent[1:]))


async def asgi_get(app, path: str) -> tuple[int, dict]:
    """GET `path` straight through the ASGI app: the status and the JSON answer."""
    scope = {**predict_scope(0), "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b""}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(message.get("body", b"") for message in sent[1:]))


def concurrently(app, requests: list[tuple[bytes, int]]) -> list[tuple[int, dict]]:
    async def all_at_once() -> list[tuple[int, dict]]:
        return await asyncio.gather(*(asgi_post(app, body, number) for body, number in requests))

    return asyncio.run(all_at_once())


def test_requests_that_arrive_together_share_one_forward_pass_and_each_gets_its_answer(
    run: RunDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_sizes = []

    def counted(model, images, numbers, device):
        batch_sizes.append(len(images))
        return head_probabilities(model, images, numbers, device)

    monkeypatch.setattr(inference, "head_probabilities", counted)
    write_adding_model(run, "adding", seed=1)
    requests = [(drawn_seven(size), number) for size, number in zip((100, 150, 200, 280, 320, 400), (0, 3, 5, 7, 8, 9))]
    answers = concurrently(served_app(run), requests)
    assert batch_sizes == [6]
    for (body, number), (status, answer) in zip(requests, answers):
        assert status == 200, answer
        image = image_file_in_mnist_form(io.BytesIO(body), "seven")
        digit_probs, sum_probs = expected(run, image, number)  # alone, as `predict` runs it
        assert answer["number"] == number and answer["input"] == image.tolist()
        assert np.allclose(answer["digit_probabilities"], digit_probs, atol=1e-5)
        assert np.allclose(answer["sum_probabilities"], sum_probs, atol=1e-5)
        assert answer["sum"] == int(np.argmax(sum_probs))
    assert len({json.dumps(answer["sum_probabilities"]) for _, answer in answers}) == 6  # no answer went to another


def test_the_server_logs_an_error_in_one_line() -> None:
    try:
        raise RuntimeError("out of memory")
    except RuntimeError:
        record = logging.LogRecord(
            "uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application\n", None, sys.exc_info()
        )
    assert logs.OneLine().format(record) == "error: Exception in ASGI application: RuntimeError: out of memory"
    assert logs.NotCancelled().filter(record)
    record.exc_info = (asyncio.CancelledError, asyncio.CancelledError(), None)
    assert not logs.NotCancelled().filter(record)


class Unreadable:
    """A result whose values cannot be read back: on a GPU, a kernel's error surfaces there."""

    def tolist(self) -> list:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("where", ["in the forward pass", "reading its results"])
def test_a_failing_batch_is_a_500_for_its_requests_and_the_next_batch_is_served(
    run: RunDir, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    failures = [True]

    def fails_once(model, images, numbers, device):
        if failures and failures.pop() and where == "in the forward pass":
            raise RuntimeError("out of memory")
        if where == "reading its results" and len(images) == 3:
            return Unreadable(), Unreadable()
        return head_probabilities(model, images, numbers, device)

    monkeypatch.setattr(inference, "head_probabilities", fails_once)
    app = served_app(run)
    answers = concurrently(app, [(drawn_seven(), number) for number in (1, 2, 3)])
    assert answers == [(500, {"error": "internal error (RuntimeError)"})] * 3
    assert [status for status, _ in concurrently(app, [(drawn_seven(), 4)])] == [200]


def test_a_client_that_left_does_not_break_its_batch(run: RunDir) -> None:
    batches, served = Batches(CPU), ModelFollower(run, CPU).current
    image = image_file_in_mnist_form(io.BytesIO(drawn_seven()), "seven")

    async def one_leaves() -> tuple[list, list]:
        leaving = asyncio.create_task(batches.probabilities(served, image, 1))
        staying = asyncio.create_task(batches.probabilities(served, image, 2))
        await asyncio.sleep(0)  # both are waiting for the batch, which has not run yet
        leaving.cancel()
        return await staying

    digit_probs, sum_probs = asyncio.run(one_leaves())
    assert np.allclose(sum_probs, expected(run, image, 2)[1], atol=1e-5)


def test_a_slow_model_load_does_not_hold_the_other_requests(run: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a new model waits while a commit of the folder is unfinished (seconds, when the
    commit is slow): in a thread, while /healthz answers at once with the model serving now."""
    app, read = served_app(run), follower_module.read_served_model

    def slow_read(run: RunDir, device: torch.device, runtime: str):
        time.sleep(2)
        return read(run, device, runtime)

    monkeypatch.setattr(follower_module, "read_served_model", slow_read)
    write_model(run, "run2", seed=1)

    async def meanwhile() -> tuple:
        started = time.monotonic()
        predicting = asyncio.ensure_future(asgi_post(app, drawn_seven(), 3))
        await asyncio.sleep(0.05)  # the prediction has begun loading run2 and waits for it
        health = await asgi_get(app, "/healthz")
        health_took = time.monotonic() - started
        return health, health_took, await predicting, time.monotonic() - started

    health, health_took, (status, answer), took = asyncio.run(meanwhile())
    assert health == (200, {"status": "ok", "run_id": "run1", "problem": None}) and health_took < 1, health_took
    assert (status, answer["run_id"]) == (200, "run2") and took >= 2


def test_a_model_that_answers_nan_gets_a_clear_error(run: RunDir, client: TestClient, runtime: str) -> None:
    """JSON has no NaN: a model whose weights are NaN answers every image with a 500 that says
    so in one line (not an internal error), and the server serves on."""
    model = build_model("lean")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    save_model(run.model, model, model_metadata("lean", "broken", epoch=2))
    if runtime == "onnx":
        write_export(run)
    for _ in range(2):
        response = client.post("/api/predict?number=3", content=drawn_seven(), headers=PNG)
        assert_refused(response, 500, "the model of run broken answered NaN, not probabilities: train it again")
    assert client.get("/healthz").json() == {"status": "ok", "run_id": "broken", "problem": None}


# --------------------------------------------------------------------------- refused requests


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def animated(fmt: str) -> bytes:
    frames = [Image.new("L", (32, 32), value) for value in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (280, 280), "white").save(buffer, "PNG")
    return buffer.getvalue()


PNG = {"Content-Type": "image/png"}
JSON = {"Content-Type": "application/json"}


UPLOADS_REFUSED = {  # refused alike as a raw body and as a form: name -> ((body, number[, type]), status, words)
    "no number": (lambda: (drawn_seven(), None), 400, "missing field: number"),
    "number 10": (lambda: (drawn_seven(), 10), 400, "0-9"),
    "number -1": (lambda: (drawn_seven(), -1), 400, "0-9"),
    "number x": (lambda: (drawn_seven(), "x"), 400, "0-9"),
    "empty image": (lambda: (b"", 1), 400, "empty"),
    "not an image": (lambda: (b"hello, world" * 10, 1), 422, "not an image"),
    "truncated png": (lambda: (drawn_seven()[:300], 1), 422, "cannot read image"),
    "animated gif": (lambda: (animated("GIF"), 1, "application/octet-stream"), 422, "PNG or JPEG"),
    "animated png": (lambda: (animated("PNG"), 1), 422, "animated"),
    "empty canvas": (lambda: (blank_png(), 1), 422, "blank"),
    "over pixel limit": (lambda: (png_claiming(5000, 5000), 1), 422, "over 4096 x 4096 pixels"),
    "pixel bomb": (lambda: (png_claiming(20000, 20000), 1), 422, "over 4096 x 4096 pixels"),
    "too big": (lambda: (b"\0" * (MAX_BODY + 1), 1), 413, "limit"),
}
REFUSED = {  # name -> (the arguments of client.post, status, words of the error)
    **{
        f"{name}, {encoding}": (lambda make=make, encoding=encoding: upload(encoding, *make()), status, words)
        for name, (make, status, words) in UPLOADS_REFUSED.items()
        for encoding in ENCODINGS
    },
    "form without a file": (
        lambda: {"url": "/api/predict", "files": {"number": (None, "3")}},
        400,
        "missing image: the form has no file",
    ),
    "form with two files": (
        lambda: {"url": "/api/predict", "files": [("image", ("a", drawn_seven())), ("more", ("b", drawn_seven()))]},
        400,
        "send one image file in the form, not 2",
    ),
    "form with the number as a file": (
        lambda: {"url": "/api/predict", "files": {"image": ("a", drawn_seven()), "number": ("n", b"3")}},
        400,
        "not 2",
    ),
    "form without a boundary": (
        lambda: raw("/api/predict", drawn_seven(), {"Content-Type": "multipart/form-data"}),
        400,
        "not a valid multipart/form-data body: Missing boundary",
    ),
    "form that is not one": (
        lambda: raw("/api/predict", drawn_seven(), {"Content-Type": "multipart/form-data; boundary=x"}),
        400,
        "not a valid multipart/form-data body: Invalid multipart data",
    ),
    "text body": (lambda: raw("/api/predict?number=1", b"seven", {"Content-Type": "text/plain"}), 415, "PNG/JPEG"),
    "bad json": (lambda: raw("/api/predict", b"{nope", {"Content-Type": "application/json"}), 400, "not valid JSON"),
    "json list": (lambda: raw("/api/predict", b"[1, 2]", {"Content-Type": "application/json"}), 400, "object"),
    "json no number": (
        lambda: raw(
            "/api/predict",
            json.dumps({"pixels": [[0] * 28] * 28}).encode(),
            {"Content-Type": "application/json"},
        ),
        400,
        "number",
    ),
    "json bool number": (
        lambda: raw(
            "/api/predict",
            json.dumps({"number": True, "pixels": [[0] * 28] * 28}).encode(),
            {"Content-Type": "application/json"},
        ),
        400,
        "0-9",
    ),
    "json no pixels": (
        lambda: raw("/api/predict", b'{"number": 3}', {"Content-Type": "application/json"}),
        400,
        "missing field: pixels",
    ),
    "json 27 rows": (
        lambda: raw(
            "/api/predict",
            json.dumps({"number": 3, "pixels": [[9] * 28] * 27}).encode(),
            {"Content-Type": "application/json"},
        ),
        400,
        "28 rows",
    ),
    "json ragged": (
        lambda: raw(
            "/api/predict",
            json.dumps({"number": 3, "pixels": [[9] * 28] * 27 + [[1]]}).encode(),
            {"Content-Type": "application/json"},
        ),
        400,
        "28 rows",
    ),
    "json 256": (
        lambda: raw(
            "/api/predict",
            json.dumps({"number": 3, "pixels": [[256] * 28] * 28}).encode(),
            {"Content-Type": "application/json"},
        ),
        400,
        "0-255",
    ),
    "json blank": (
        lambda: raw(
            "/api/predict",
            json.dumps({"number": 3, "pixels": [[0] * 28] * 28}).encode(),
            {"Content-Type": "application/json"},
        ),
        422,
        "blank",
    ),
    "json nested 100,000 deep": (
        lambda: raw("/api/predict", b'{"number": 3, "pixels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON),
        400,
        "nested too deep",
    ),
    "json pixel 10**400": (
        lambda: raw("/api/predict", json.dumps({"number": 3, "pixels": [[10**400] * 28] * 28}).encode(), JSON),
        400,
        "0-255",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_requests_get_a_one_line_4xx_and_the_server_keeps_serving(
    client: TestClient, run: RunDir, tmp_path: Path, case: str
) -> None:
    make, status, words = REFUSED[case]
    before = snapshot(tmp_path)
    assert_refused(client.post(**make()), status, words)
    assert client.get("/healthz").status_code == 200
    assert snapshot(tmp_path) == before  # the server writes nothing, not even for bad input


@pytest.mark.parametrize("content_type", ["image/png", "multipart/form-data; boundary=x"])
def test_oversize_body_is_refused_before_it_is_read_whole(client: TestClient, run: RunDir, content_type: str) -> None:
    """413 from a false Content-Length, and from a streamed body with none once 2 MB arrived
    (driven at the ASGI level: the test client would collect the whole body first)."""
    response = client.post(
        "/api/predict?number=1",
        content=b"\0" * 10,
        headers={"Content-Type": content_type, "Content-Length": str(MAX_BODY + 1)},
    )
    assert_refused(response, 413, "limit")

    app, chunk, pulled, sent = served_app(run), 256 * 1024, [], []

    async def receive() -> dict:
        pulled.append(chunk)
        return {"type": "http.request", "body": b"\0" * chunk, "more_body": len(pulled) < 64}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = predict_scope(1)
    scope["headers"] = [(b"host", b"127.0.0.1:8000"), (b"content-type", content_type.encode())]
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert len(pulled) == MAX_BODY // chunk + 1  # stopped at the first chunk over the limit, not at 64


def test_a_form_upload_stays_in_memory(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starlette spools a form's file over 1 MB to a temporary file: `serve` writes no file."""

    def no_file(*args, **kwargs):
        raise AssertionError("a temporary file was made")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_file)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    assert 1024 * 1024 < len(buffer.getvalue()) < MAX_BODY
    response = client.post(**upload("form", buffer.getvalue(), 3))
    assert response.status_code == 200, response.text


def test_wrong_method_and_unknown_route(client: TestClient) -> None:
    assert_refused(client.get("/api/predict"), 405, "method not allowed")
    assert_refused(client.post("/api/model"), 405, "method not allowed")
    assert_refused(client.get("/api/nothing"), 404, "not found")


# --------------------------------------------------------------------------- following the run


@pytest.mark.parametrize("runtime", ["torch"])  # onnx: test_the_onnx_model_follows_its_export
def test_the_model_follows_the_artifacts_folder(client: TestClient, run: RunDir) -> None:
    body = drawn_seven()
    first = client.post("/api/predict?number=2", content=body, headers=PNG).json()
    write_model(run, "run2", seed=1)  # a new `train` publishes its model
    second = client.post("/api/predict?number=2", content=body, headers=PNG).json()
    assert second["run_id"] == "run2" and second["problem"] is None
    assert second["digit_probabilities"] != first["digit_probabilities"]
    assert np.allclose(
        second["digit_probabilities"], expected(run, np.array(second["input"], dtype=np.uint8), 2)[0], atol=1e-6
    )

    publish_model(run, b"not a model")  # unreadable: run2 keeps serving
    third = client.post("/api/predict?number=2", content=body, headers=PNG).json()
    assert third["run_id"] == "run2" and third["digit_probabilities"] == second["digit_probabilities"]
    assert "not a valid safetensors file" in third["problem"] and "still serving run run2" in third["problem"]
    assert client.get("/api/model").json()["problem"] == third["problem"]

    run.model.unlink()
    assert "not found" in client.get("/api/model").json()["problem"]
    assert "not found" in client.get("/healthz").json()["problem"]
    write_model(run, "run3", seed=2)
    assert client.get("/api/model").json()["run_id"] == "run3"  # it waits for the load /healthz does not wait for
    assert client.get("/healthz").json() == {"status": "ok", "run_id": "run3", "problem": None}


@pytest.mark.parametrize("runtime", ["onnx"])
def test_the_onnx_model_follows_its_export(client: TestClient, run: RunDir) -> None:
    """On onnxruntime a new model.safetensors answers once it is exported: until then model.onnx
    is stale, and the model before it keeps serving, with the reason."""
    body = drawn_seven()
    first = client.post("/api/predict?number=2", content=body, headers=PNG).json()
    write_model(run, "run2", seed=1)  # a new `train`: model.onnx is now the export of another model
    second = client.post("/api/predict?number=2", content=body, headers=PNG).json()
    assert second["run_id"] == "run1" and second["digit_probabilities"] == first["digit_probabilities"]
    assert "model.onnx is stale" in second["problem"] and "still serving run run1" in second["problem"]
    write_export(run)  # `mnistsum export`
    third = client.post("/api/predict?number=2", content=body, headers=PNG).json()
    assert third["run_id"] == "run2" and third["problem"] is None
    assert np.allclose(
        third["digit_probabilities"], expected(run, np.array(third["input"], dtype=np.uint8), 2)[0], atol=1e-6
    )
    damaged = run.onnx.read_bytes()
    with commit(run.root) as change:
        change.write(run.onnx.name, damaged[: len(damaged) // 2])
    fourth = client.get("/api/model").json()
    assert fourth["run_id"] == "run2" and "not a valid ONNX file" in fourth["problem"]


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize("package", ["starlette", "uvicorn", "python_multipart"])
def test_serve_without_the_extra_says_how_to_install_it(
    run_cli, run: RunDir, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    for module in [name for name in sys.modules if name.startswith("mnistsum_cli.serve.")]:
        monkeypatch.delitem(sys.modules, module)  # imported afresh, without the package
    for name in [name for name in sys.modules if name == package or name.startswith(f"{package}.")]:
        monkeypatch.setitem(sys.modules, name, None)
    code, out, err = run_cli("serve", "--artifacts", run.root, "--cpu")
    assert code == 1
    assert "pip install 'mnistsum[serve]'" in assert_one_line_error(err, out)
    assert "pip install 'mnistsum[serve]'" in " ".join(run_cli("serve", "--help")[1].split())


def test_serve_refuses_what_it_cannot_serve(run_cli, tmp_path: Path, run: RunDir) -> None:
    code, out, err = run_cli("serve", "--artifacts", tmp_path / "nowhere", "--cpu")
    assert code == 1 and "no such folder" in assert_one_line_error(err, out)
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli("serve", "--artifacts", tmp_path / "empty", "--cpu")
    assert code == 1 and "run `mnistsum train` first" in assert_one_line_error(err, out)
    run.model.write_bytes(b"\0" * 100)
    code, out, err = run_cli("serve", "--artifacts", run.root, "--cpu")
    assert code == 1 and "not a valid safetensors file" in assert_one_line_error(err, out)
    code, out, err = run_cli("serve", "--artifacts", run.root, "--port", "70000")
    assert code == 2 and "--port" in assert_one_line_error(err, out)
    code, out, err = run_cli("serve", "--artifacts", run.root, "--gpu", "0", "--cpu")
    assert code == 2 and "exclude each other" in assert_one_line_error(err, out)  # the device policy of every command


def test_serve_on_onnx_refuses_a_missing_or_stale_export(run_cli, run: RunDir) -> None:
    code, out, err = run_cli("serve", "--artifacts", run.root, "--runtime", "onnx")
    assert code == 1 and "model.onnx not found: run `mnistsum export` first" in assert_one_line_error(err, out)
    write_export(run)
    write_model(run, "run2", seed=1)
    code, out, err = run_cli("serve", "--artifacts", run.root, "--runtime", "onnx")
    assert code == 1 and "model.onnx is stale" in assert_one_line_error(err, out)
    code, out, err = run_cli("serve", "--artifacts", run.root, "--runtime", "onnx", "--gpu", "0")
    assert code == 2 and "--runtime onnx runs on the CPU" in assert_one_line_error(err, out)


def test_serve_on_onnx_loads_no_torch(run: RunDir) -> None:
    write_export(run)
    process, first = start_serve(run, "--runtime", "onnx", "--workers", "1")
    try:
        assert " on onnx from " in first, first
        assert healthz(port_of(first)).startswith(b"HTTP/1.1 200")
        libraries = Path(f"/proc/{process.pid}/maps").read_text()
        assert "onnxruntime" in libraries and "libtorch" not in libraries
    finally:
        kill_group(process)


def test_a_busy_port_is_one_line(run_cli, run: RunDir) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, out, err = run_cli("serve", "--artifacts", run.root, "--cpu", "--port", busy.getsockname()[1])
    assert code == 1 and "cannot listen on 127.0.0.1" in assert_one_line_error(err, out)


def start_serve(run: RunDir, *options: str) -> tuple[subprocess.Popen, str]:
    """`mnistsum serve` as a process on a free port, in a process group of its own (as a command
    in a terminal); returns it and the first line it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mnistsum_cli", "serve", "--artifacts", str(run.root), "--cpu", "--port", "0", *options],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return process, process.stdout.readline()


def healthz(port: int, host: str = "127.0.0.1") -> bytes:
    """The whole answer to GET /healthz with this Host header."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


def worker_pids(process: subprocess.Popen) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped before the open, or between the open and the read
        return True


def accepted(pid: int, port: int) -> int:
    """How many TCP connections to `port` process `pid` holds (established, from /proc)."""
    ours = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
            ours.add(f"socket:[{fields[9]}]")
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            held += os.readlink(fd) in ours
        except FileNotFoundError:  # closed since the listing (the server keeps working meanwhile)
            pass
    return held


def connect_until_each_accepts(port: int, pids: list[int], seconds: float = 60) -> list[socket.socket]:
    """Keep-alive connections, each answered once, until every process holds one: each worker
    really accepts on the shared socket (which one wins a connection is up to the kernel). The
    server starts its own uvicorn only after forking the workers and printing its address, so
    on a loaded machine the workers may take the first hundred connections: this waits for the
    server for up to `seconds`, a new connection every 50 ms once each process could hold one."""
    connections = []
    deadline = time.monotonic() + seconds
    while not all(accepted(pid, port) for pid in pids):
        assert time.monotonic() < deadline, {pid: accepted(pid, port) for pid in pids}
        if len(connections) >= len(pids):
            time.sleep(0.05)
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert connection.recv(100).startswith(b"HTTP/1.1 200")
        connections.append(connection)
    return connections


def stalled_uploads(port: int, count: int = 6) -> list[socket.socket]:
    """Uploads that never finish: 10 of the 1,000 bytes they announce, then nothing."""
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.sendall(b"POST /api/predict?number=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n")
        connection.sendall(b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
        connections.append(connection)
    return connections


def wait_until_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(gone(pid) for pid in pids)


def port_of(first: str) -> int:
    return int(first.split("http://127.0.0.1:")[1].split("/")[0])


def test_the_server_answers_only_its_own_host_names(run: RunDir) -> None:
    process, first = start_serve(run, "--workers", "1")
    try:
        port = port_of(first)
        assert healthz(port, f"localhost:{port}").startswith(b"HTTP/1.1 200")
        refused = healthz(port, f"rebound.evil.example:{port}")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        kill_group(process)
    head, body = refused.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400") and b"evil" not in head
    assert json.loads(body) == {"error": "unknown Host header: open the address `mnistsum serve` printed"}
    assert (process.returncode, out, err) == (0, "stopped\n", "")


def closed_after(connection: socket.socket, started: float, drip: bytes = b"") -> tuple[float, bytes]:
    """Seconds from `started` until the server closed the connection (at most 30: then it is
    not closed) and what it sent; meanwhile `drip` goes out one byte every 0.5 s."""
    connection.settimeout(0.5)
    answer = b""
    while time.monotonic() - started < 30:
        try:
            chunk = connection.recv(65536)
        except socket.timeout:
            if drip:
                try:
                    connection.sendall(drip[:1])
                except OSError:  # closed under it
                    return time.monotonic() - started, answer
                drip = drip[1:]
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return time.monotonic() - started, answer
        answer += chunk
    return 30.0, answer


def test_slow_and_stalled_clients_are_disconnected_in_time(run: RunDir) -> None:
    """Each of these would hold a connection for ever: headers sent a byte at a time, nothing
    at all, an upload that stalls; and the keep-alive connection after an answer."""
    process, first = start_serve(run, "--workers", "1")
    try:
        port = port_of(first)
        header = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"x" * 100 + b"\r\n\r\n"
        started = time.monotonic()  # each deadline begins when the server accepts, after this
        clients = {name: socket.create_connection(("127.0.0.1", port)) for name in ("drip", "silent", "keep-alive")}
        [stalled] = stalled_uploads(port, 1)
        clients["keep-alive"].sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        with ThreadPoolExecutor(4) as pool:
            waits = {
                "drip": pool.submit(closed_after, clients["drip"], started, header),
                "silent": pool.submit(closed_after, clients["silent"], started),
                "keep-alive": pool.submit(closed_after, clients["keep-alive"], started),
                "stalled": pool.submit(closed_after, stalled, started),
            }
            closed = {name: wait.result(timeout=60) for name, wait in waits.items()}
        assert healthz(port).startswith(b"HTTP/1.1 200")  # and the server serves on
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        kill_group(process)
    for name, limit in (("drip", HEADER_SECONDS), ("silent", HEADER_SECONDS), ("stalled", BODY_SECONDS)):
        assert limit <= closed[name][0] < limit + 2, (name, closed[name])
    assert closed["drip"][1] == closed["silent"][1] == b""
    assert closed["keep-alive"][1].startswith(b"HTTP/1.1 200") and closed["keep-alive"][0] < KEEP_ALIVE_SECONDS + 2
    head, body = closed["stalled"][1].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert json.loads(body) == {"error": f"the request body did not arrive within {BODY_SECONDS} s"}
    assert (process.returncode, out, err) == (0, "stopped\n", "")


def test_a_client_that_goes_away_is_not_an_error(run: RunDir) -> None:
    """Clients leave in the middle of an upload, or before their answer: nothing to log."""
    process, first = start_serve(run, "--workers", "1")
    try:
        port = port_of(first)
        for connection in stalled_uploads(port, 3):
            connection.close()
        with socket.create_connection(("127.0.0.1", port)) as connection:
            body = drawn_seven()
            connection.sendall(
                b"POST /api/predict?number=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        time.sleep(1)
        assert healthz(port).startswith(b"HTTP/1.1 200")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        kill_group(process)
    assert (process.returncode, out, err) == (0, "stopped\n", "")


def test_a_form_upload_to_the_server(run: RunDir) -> None:
    """As `curl -F image=@seven.png -F number=5` sends it (and a browser's FormData); a form
    that is not one is a 400, and nothing on the server's stderr."""
    httpx = pytest.importorskip("httpx")
    process, first = start_serve(run, "--workers", "1")
    try:
        url = f"http://127.0.0.1:{port_of(first)}/api/predict"
        body = drawn_seven()
        answer = httpx.post(url, files={"image": ("seven.png", body, "image/png")}, data={"number": "5"}).json()
        bad = httpx.post(url, content=body, headers={"Content-Type": "multipart/form-data; boundary=x"})
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        kill_group(process)
    assert answer["input"] == image_file_in_mnist_form(io.BytesIO(body), "seven").tolist() and answer["number"] == 5
    assert bad.status_code == 400 and "multipart" in bad.json()["error"]
    assert (process.returncode, out, err) == (0, "stopped\n", "")


@pytest.mark.parametrize("stop", ["Ctrl-C in a terminal", "SIGINT to the server", "SIGTERM to the server"])
def test_workers_share_the_port_and_stop_with_the_server(run: RunDir, stop: str) -> None:
    """Ctrl-C in a terminal signals every process of the group; `kill` the server alone: either
    way every worker exits with it, and the server says `stopped`."""
    process, first = start_serve(run, "--workers", "3")
    try:
        assert first.rstrip().endswith("(3 worker processes; Ctrl-C stops)"), first
        workers = worker_pids(process)
        assert len(workers) == 2  # and the server itself
        connections = connect_until_each_accepts(port_of(first), [process.pid, *workers])
        assert not any(gone(pid) for pid in workers)
        for connection in connections:
            connection.close()
        if stop == "Ctrl-C in a terminal":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT if stop == "SIGINT to the server" else signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        kill_group(process)
    assert (process.returncode, out, err) == (0, "stopped\n", "")
    assert all(gone(pid) for pid in workers)


def test_workers_stop_when_the_server_is_killed_even_with_requests_in_flight(run: RunDir) -> None:
    process, first = start_serve(run, "--workers", "2")
    try:
        port = port_of(first)
        [worker] = worker_pids(process)
        connect_until_each_accepts(port, [process.pid, worker])
        _held = stalled_uploads(port)  # open to the end: the worker must not wait for them for ever
        process.kill()  # no chance to stop its workers: they notice by themselves
        process.wait(timeout=60)
        assert wait_until_gone([worker], SERVE_STOP_SECONDS + 5)
        with pytest.raises(ConnectionRefusedError):
            healthz(port)
    finally:
        kill_group(process)


def test_ctrl_c_cancels_stalled_uploads_after_the_grace_with_one_line_each(run: RunDir) -> None:
    process, first = start_serve(run, "--workers", "2")
    try:
        port = port_of(first)
        connect_until_each_accepts(port, [process.pid, *worker_pids(process)])
        _held = stalled_uploads(port)  # open to the end of the test
        time.sleep(0.5)  # each request is in progress, reading its body
        started = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        kill_group(process)
    assert (process.returncode, out) == (0, "stopped\n")
    assert took < 2 * GRACE_SECONDS + 3
    assert err and all(
        line.startswith("error: Cancel ") and "timeout graceful shutdown exceeded" in line for line in err.splitlines()
    ), err


def test_a_worker_that_dies_is_reported_and_the_others_serve_on(run: RunDir) -> None:
    process, first = start_serve(run, "--workers", "2")
    try:
        [worker] = worker_pids(process)
        os.kill(worker, signal.SIGKILL)
        wait_until_gone([worker], 30)
        assert healthz(port_of(first)).startswith(b"HTTP/1.1 200")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        kill_group(process)
    assert (process.returncode, out) == (0, "stopped\n")
    assert err == f"warning: worker process {worker} was killed (SIGKILL); the others go on serving\n"


def kill_group(process: subprocess.Popen) -> None:
    """Whatever a test left running: the server and its workers."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


CGROUPS = {  # name -> (/proc/self/cgroup, {file under /sys/fs/cgroup: text}, cores in the affinity mask, workers)
    "v2, 2 CPUs": ("0::/\n", {"cpu.max": "200000 100000\n"}, 16, 2),
    "v2, no limit": ("0::/\n", {"cpu.max": "max 100000\n"}, 16, MAX_DEFAULT_WORKERS),
    "v2, 1.5 CPUs round up": ("0::/\n", {"cpu.max": "150000 100000\n"}, 16, 2),
    "v2, half a CPU": ("0::/\n", {"cpu.max": "50000 100000\n"}, 16, 1),
    "v2, fewer cores than the quota": ("0::/\n", {"cpu.max": "300000 100000\n"}, 2, 2),
    "v2, a parent's limit": (
        "0::/user.slice/app.service\n",
        {"user.slice/cpu.max": "300000 100000\n", "user.slice/app.service/cpu.max": "max 100000\n"},
        16,
        3,
    ),
    "v1, 1 CPU, the host's path": (
        "5:memory:/docker/0123abcd\n4:cpu,cpuacct:/docker/0123abcd\n",  # the container sees its own cgroup as the root
        {"cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
        16,
        1,
    ),
    "v1, no limit": (
        "4:cpu,cpuacct:/\n",
        {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
        16,
        MAX_DEFAULT_WORKERS,
    ),
    "v2, unreadable": ("0::/\n", {"cpu.max": "lots\n"}, 3, 3),
    "no cgroup files": ("0::/\n", {}, 3, 3),
}


@pytest.mark.parametrize("case", list(CGROUPS))
def test_the_default_worker_count_keeps_to_the_cgroup_cpu_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    membership, files, cores, workers = CGROUPS[case]
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    (tmp_path / "cgroup").write_text(membership)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_workers(on_cpu=True, cgroups=tmp_path / "fs", membership=tmp_path / "cgroup") == workers


def test_worker_count(run_cli, run: RunDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_cgroup = {"cgroups": tmp_path, "membership": tmp_path / "none"}  # whatever this machine's quota is
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers(on_cpu=True, **no_cgroup) == MAX_DEFAULT_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_workers(on_cpu=True, **no_cgroup) == 1
    assert default_workers(on_cpu=False) == 1
    with pytest.raises(BadOption, match="--workers 2: one process per GPU"):
        lifecycle.serve(run, "127.0.0.1", 0, torch.device("cuda", 0), 2, say=print, warn=print)
    code, out, err = run_cli("serve", "--artifacts", run.root, "--cpu", "--workers", "0")
    assert code == 2 and "--workers" in assert_one_line_error(err, out)
