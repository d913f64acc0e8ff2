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
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import assert_one_line_error, model_metadata, publish_model, snapshot
from mnistsum_cli.checkpoint import save_model
from mnistsum_cli.errors import BadOption
from mnistsum_cli.fingerprints import fingerprint_file
from mnistsum_cli.models import build_model
from mnistsum_cli.paths import RunDir
from mnistsum_cli.predict import head_probabilities, prepare_image
from mnistsum_cli.schemas import MODEL_META
from mnistsum_cli.store import write_json

starlette = pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[dev]'")
from starlette.testclient import TestClient  # noqa: E402 (after the importorskip)

from mnistsum_cli import serve as serve_module  # noqa: E402
from mnistsum_cli.serve import GRACE_SECONDS, MAX_BODY, Batches, ModelFollower, create_app  # noqa: E402
from mnistsum_cli.workers import MAX_DEFAULT_WORKERS, default_workers  # noqa: E402
from mnistsum_cli.workers import STOP_SECONDS as SERVE_STOP_SECONDS  # noqa: E402

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


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "artifacts")
    write_model(run, "run1", seed=0)
    return run


@pytest.fixture
def client(run: RunDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.chdir(tmp_path)
    return TestClient(create_app(ModelFollower(run, CPU)), raise_server_exceptions=False)


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
    from mnistsum_cli.checkpoint import load_model

    model, _ = load_model(run.model, CPU)
    digit, total = head_probabilities(model, torch.from_numpy(image[None]), torch.tensor([number]), CPU)
    return digit[0].tolist(), total[0].tolist()


def assert_refused(response, status: int, words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    assert "\n" not in message and words in message, message


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


def test_healthz_and_model_card(client: TestClient, run: RunDir) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "run_id": "run1", "problem": None}
    card = client.get("/api/model").json()
    assert (card["run_id"], card["arch"], card["epoch"], card["problem"]) == ("run1", "lean", 2, None)
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
    write_json(run.plots_manifest, {"inputs": {"model": sha}, "files": ["loss.png", "../config.json", "/etc/passwd"]})
    card = client.get("/api/model").json()
    assert card["evaluations"] == {"test": {"rows": 10, "digit_accuracy": 0.9, "sum_accuracy": 0.8, "consistency": 1.0}}
    assert card["plots"] == ["/plots/loss.png"]
    response = client.get("/plots/loss.png")
    assert response.status_code == 200 and response.content == png and response.headers["content-type"] == "image/png"
    assert_refused(client.get("/plots/unlisted.png"), 404, "manifest")
    write_json(run.plots_manifest, {"inputs": {"model": "another model"}, "files": ["loss.png"]})
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
        "/mnistsum_cli/serve.py",
        "/static/app.js",
    ],
)
def test_no_path_reaches_other_files(client: TestClient, run: RunDir, path: str) -> None:
    run.plots.mkdir()
    write_json(
        run.plots_manifest, {"inputs": {"model": fingerprint_file(run.model, MODEL_META)}, "files": ["loss.png"]}
    )
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert response.json() == {"error": "not found"} or "manifest" in response.json()["error"]


def test_predict_png_answers_as_predict_does(client: TestClient, run: RunDir) -> None:
    body = drawn_seven()
    response = client.post("/api/predict?number=4", content=body, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    answer = response.json()
    image = prepare_image(io.BytesIO(body), "seven")
    digit_probs, sum_probs = expected(run, image, 4)
    assert answer["input"] == image.tolist()
    assert np.allclose(answer["digit_probabilities"], digit_probs, atol=1e-6)
    assert np.allclose(answer["sum_probabilities"], sum_probs, atol=1e-6)
    assert answer["digit"] == int(np.argmax(digit_probs)) and answer["sum"] == int(np.argmax(sum_probs))
    assert (answer["number"], answer["run_id"], answer["problem"]) == (4, "run1", None)
    assert len(answer["digit_probabilities"]) == 10 and len(answer["sum_probabilities"]) == 19


def test_predict_jpeg_and_pixels(client: TestClient, run: RunDir) -> None:
    jpeg = drawn_seven(fmt="JPEG")
    answer = client.post("/api/predict?number=0", content=jpeg, headers={"Content-Type": "image/jpeg"}).json()
    assert answer["input"] == prepare_image(io.BytesIO(jpeg), "jpeg").tolist()
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
        "headers": [(b"content-type", b"image/png"), *headers],
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

    monkeypatch.setattr(serve_module, "head_probabilities", counted)
    write_adding_model(run, "adding", seed=1)
    requests = [(drawn_seven(size), number) for size, number in zip((100, 150, 200, 280, 320, 400), (0, 3, 5, 7, 8, 9))]
    answers = concurrently(create_app(ModelFollower(run, CPU)), requests)
    assert batch_sizes == [6]
    for (body, number), (status, answer) in zip(requests, answers):
        assert status == 200, answer
        image = prepare_image(io.BytesIO(body), "seven")
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
    assert serve_module.OneLine().format(record) == "error: Exception in ASGI application: RuntimeError: out of memory"
    assert serve_module.NotCancelled().filter(record)
    record.exc_info = (asyncio.CancelledError, asyncio.CancelledError(), None)
    assert not serve_module.NotCancelled().filter(record)


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

    monkeypatch.setattr(serve_module, "head_probabilities", fails_once)
    app = create_app(ModelFollower(run, CPU))
    answers = concurrently(app, [(drawn_seven(), number) for number in (1, 2, 3)])
    assert answers == [(500, {"error": "internal error (RuntimeError)"})] * 3
    assert [status for status, _ in concurrently(app, [(drawn_seven(), 4)])] == [200]


def test_a_client_that_left_does_not_break_its_batch(run: RunDir) -> None:
    batches, served = Batches(CPU), ModelFollower(run, CPU).current
    image = prepare_image(io.BytesIO(drawn_seven()), "seven")

    async def one_leaves() -> tuple[list, list]:
        leaving = asyncio.create_task(batches.probabilities(served, image, 1))
        staying = asyncio.create_task(batches.probabilities(served, image, 2))
        await asyncio.sleep(0)  # both are waiting for the batch, which has not run yet
        leaving.cancel()
        return await staying

    digit_probs, sum_probs = asyncio.run(one_leaves())
    assert np.allclose(sum_probs, expected(run, image, 2)[1], atol=1e-5)


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
REFUSED = {
    "no number": (lambda: ("/api/predict", drawn_seven(), PNG), 400, "missing field: number"),
    "number 10": (lambda: ("/api/predict?number=10", drawn_seven(), PNG), 400, "0-9"),
    "number -1": (lambda: ("/api/predict?number=-1", drawn_seven(), PNG), 400, "0-9"),
    "number x": (lambda: ("/api/predict?number=x", drawn_seven(), PNG), 400, "0-9"),
    "empty body": (lambda: ("/api/predict?number=1", b"", PNG), 400, "empty"),
    "not an image": (lambda: ("/api/predict?number=1", b"hello, world" * 10, PNG), 422, "not an image"),
    "truncated png": (lambda: ("/api/predict?number=1", drawn_seven()[:300], PNG), 422, "cannot read image"),
    "animated gif": (
        lambda: ("/api/predict?number=1", animated("GIF"), {"Content-Type": "application/octet-stream"}),
        422,
        "PNG or JPEG",
    ),
    "animated png": (lambda: ("/api/predict?number=1", animated("PNG"), PNG), 422, "animated"),
    "empty canvas": (lambda: ("/api/predict?number=1", blank_png(), PNG), 422, "blank"),
    "over pixel limit": (
        lambda: ("/api/predict?number=1", png_claiming(5000, 5000), PNG),
        422,
        "over 4096 x 4096 pixels",
    ),
    "pixel bomb": (lambda: ("/api/predict?number=1", png_claiming(20000, 20000), PNG), 422, "over 4096 x 4096 pixels"),
    "text body": (lambda: ("/api/predict?number=1", b"seven", {"Content-Type": "text/plain"}), 415, "PNG/JPEG"),
    "bad json": (lambda: ("/api/predict", b"{nope", {"Content-Type": "application/json"}), 400, "not valid JSON"),
    "json list": (lambda: ("/api/predict", b"[1, 2]", {"Content-Type": "application/json"}), 400, "object"),
    "json no number": (
        lambda: (
            "/api/predict",
            json.dumps({"pixels": [[0] * 28] * 28}).encode(),
            {"Content-Type": "application/json"},
        ),
        400,
        "number",
    ),
    "json bool number": (
        lambda: (
            "/api/predict",
            json.dumps({"number": True, "pixels": [[0] * 28] * 28}).encode(),
            {"Content-Type": "application/json"},
        ),
        400,
        "0-9",
    ),
    "json no pixels": (
        lambda: ("/api/predict", b'{"number": 3}', {"Content-Type": "application/json"}),
        400,
        "missing field: pixels",
    ),
    "json 27 rows": (
        lambda: (
            "/api/predict",
            json.dumps({"number": 3, "pixels": [[9] * 28] * 27}).encode(),
            {"Content-Type": "application/json"},
        ),
        400,
        "28 rows",
    ),
    "json ragged": (
        lambda: (
            "/api/predict",
            json.dumps({"number": 3, "pixels": [[9] * 28] * 27 + [[1]]}).encode(),
            {"Content-Type": "application/json"},
        ),
        400,
        "28 rows",
    ),
    "json 256": (
        lambda: (
            "/api/predict",
            json.dumps({"number": 3, "pixels": [[256] * 28] * 28}).encode(),
            {"Content-Type": "application/json"},
        ),
        400,
        "0-255",
    ),
    "json blank": (
        lambda: (
            "/api/predict",
            json.dumps({"number": 3, "pixels": [[0] * 28] * 28}).encode(),
            {"Content-Type": "application/json"},
        ),
        422,
        "blank",
    ),
    "too big": (lambda: ("/api/predict?number=1", b"\0" * (MAX_BODY + 1), PNG), 413, "limit"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_requests_get_a_one_line_4xx_and_the_server_keeps_serving(
    client: TestClient, run: RunDir, tmp_path: Path, case: str
) -> None:
    make, status, words = REFUSED[case]
    path, body, headers = make()
    before = snapshot(tmp_path)
    assert_refused(client.post(path, content=body, headers=headers), status, words)
    assert client.get("/healthz").status_code == 200
    assert snapshot(tmp_path) == before  # the server writes nothing, not even for bad input


def test_oversize_body_is_refused_before_it_is_read_whole(client: TestClient, run: RunDir) -> None:
    """413 from a false Content-Length, and from a streamed body with none once 2 MB arrived
    (driven at the ASGI level: the test client would collect the whole body first)."""
    response = client.post(
        "/api/predict?number=1", content=b"\0" * 10, headers={**PNG, "Content-Length": str(MAX_BODY + 1)}
    )
    assert_refused(response, 413, "limit")

    app, chunk, pulled, sent = create_app(ModelFollower(run, CPU)), 256 * 1024, [], []

    async def receive() -> dict:
        pulled.append(chunk)
        return {"type": "http.request", "body": b"\0" * chunk, "more_body": len(pulled) < 64}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(predict_scope(1, (b"host", b"test")), receive, send))
    assert sent[0]["status"] == 413
    assert len(pulled) == MAX_BODY // chunk + 1  # stopped at the first chunk over the limit, not at 64


def test_wrong_method_and_unknown_route(client: TestClient) -> None:
    assert_refused(client.get("/api/predict"), 405, "method not allowed")
    assert_refused(client.post("/api/model"), 405, "method not allowed")
    assert_refused(client.get("/api/nothing"), 404, "not found")


# --------------------------------------------------------------------------- following the run


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
    assert "not found" in client.get("/healthz").json()["problem"]
    write_model(run, "run3", seed=2)
    assert client.get("/healthz").json() == {"status": "ok", "run_id": "run3", "problem": None}


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize("package", ["starlette", "uvicorn"])
def test_serve_without_the_extra_says_how_to_install_it(
    run_cli, run: RunDir, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    monkeypatch.delitem(sys.modules, "mnistsum_cli.serve", raising=False)
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


def healthz(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return connection.recv(100)


def worker_pids(process: subprocess.Popen) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
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


def connect_until_each_accepts(port: int, pids: list[int], most: int = 60) -> list[socket.socket]:
    """Keep-alive connections, each answered once, until every process holds one: each worker
    really accepts on the shared socket (which one wins a connection is up to the kernel)."""
    connections = []
    while not all(accepted(pid, port) for pid in pids):
        assert len(connections) < most, {pid: accepted(pid, port) for pid in pids}
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.recv(100).startswith(b"HTTP/1.1 200")
        connections.append(connection)
    return connections


def stalled_uploads(port: int, count: int = 6) -> list[socket.socket]:
    """Uploads that never finish: 10 of the 1,000 bytes they announce, then nothing."""
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.sendall(b"POST /api/predict?number=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")
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


def test_worker_count(run_cli, run: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers(on_cpu=True) == MAX_DEFAULT_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_workers(on_cpu=True) == 1
    assert default_workers(on_cpu=False) == 1
    with pytest.raises(BadOption, match="--workers 2: one process per GPU"):
        serve_module.serve(run, "127.0.0.1", 0, torch.device("cuda", 0), 2, say=print, warn=print)
    code, out, err = run_cli("serve", "--artifacts", run.root, "--cpu", "--workers", "0")
    assert code == 2 and "--workers" in assert_one_line_error(err, out)
