"""`mnistsum serve` in a real browser: headless Debian chromium driven by Playwright draws digits
with pointer events, picks numbers by mouse and keyboard, uploads a file, and checks what the
page shows against the API and against `predict`'s preparation. Locally skipped without
chromium; under CI (CI=true) a missing browser fails. Screenshots go to
$MNISTSUM_SCREENSHOT_DIR (default: a pytest temporary folder)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import _main, publish_model
from mnistsum_cli.data.images import image_file_in_mnist_form
from mnistsum_cli.data.mnist import MNIST_DIR_ENV
from mnistsum_cli.store.paths import RunDir
from strokes import DIGIT_STROKES

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MIN_READ_RIGHT = 9  # of the 10 drawn digits, with the cpu preset's model


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must run the browser tests (.ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A headless chromium with a fresh profile (a Playwright BrowserContext)."""
    if not CHROMIUM.is_file():
        _missing(f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 1000},
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("MNISTSUM_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def serving(run: RunDir) -> Iterator[str]:
    """`mnistsum serve` as a process on a free port; yields its URL; Ctrl-C at the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mnistsum_cli", "serve", "--artifacts", str(run.root), "--cpu", "--port", "0"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = process.stdout.readline()
        assert " at http://127.0.0.1:" in first, first + process.stderr.read()
        yield first.split(" at ")[1].split()[0]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0 and "Traceback" not in err, err
    finally:
        process.kill()


class Page:
    """The served page in a browser tab, with the requests it made."""

    def __init__(self, context, url: str) -> None:
        self.url, self.tab, self.requests, self.sent = url, context.new_page(), [], b""
        self.tab.on("request", lambda request: self.requests.append(request.url))
        self.tab.goto(url)
        self.tab.wait_for_selector("#card dd")

    def wait_until(self, expression: str, timeout: float = 60.0) -> None:
        """Poll a JavaScript expression (wait_for_function would eval it, which the page's CSP forbids)."""
        deadline = time.monotonic() + timeout
        while not self.tab.evaluate(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            self.tab.wait_for_timeout(20)

    def answer(self, act) -> dict:
        """Do `act`, wait for the page to show the answer it asked for, return the API's JSON."""
        before = int(self.tab.get_attribute("#result", "data-seq"))
        with self.tab.expect_response(lambda response: "/api/predict" in response.url) as response:
            act()
        answer = response.value.json()  # read at once: the browser may drop the body later
        self.sent = response.value.request.post_data_buffer or b""
        self.wait_until(
            f"(r => r.dataset.status !== 'waiting' && Number(r.dataset.seq) > {before})(document.getElementById('result'))"
        )
        return answer

    def draw(self, strokes: list[list[tuple[float, float]]]) -> None:
        """Each stroke as a real pointer stroke (press, move in small steps, release)."""
        box = self.tab.locator("#pad").bounding_box()
        mouse = self.tab.mouse
        for stroke in strokes:
            points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
            mouse.move(*points[0])
            mouse.down()
            for point in points[1:]:
                mouse.move(*point, steps=5)
            mouse.up()

    def shown(self) -> tuple[str, str]:
        return self.tab.text_content("#digit"), self.tab.text_content("#sum")

    def seen(self) -> np.ndarray:
        """The 28 x 28 view, read back from its canvas."""
        data = self.tab.evaluate(
            "Array.from(document.getElementById('seen').getContext('2d').getImageData(0, 0, 28, 28).data)"
        )
        return np.array(data, dtype=np.uint8).reshape(28, 28, 4)[:, :, 0]

    def bar_shares(self, bars: str) -> list[float]:
        """Each probability bar's drawn fill as a share of its track: the layout a person sees,
        not the numbers in the DOM."""
        return self.tab.evaluate(
            f"Array.from(document.querySelectorAll('#{bars} .track'))"
            ".map(track => track.querySelector('.fill').getBoundingClientRect().width / track.getBoundingClientRect().width)"
        )

    def pick(self, number: int) -> None:
        self.tab.click(f"#numbers input[value='{number}'] >> xpath=..")

    def foreign_requests(self) -> list[str]:
        origin = urlsplit(self.url).netloc
        return [url for url in self.requests if urlsplit(url).netloc != origin or urlsplit(url).scheme != "http"]


# --------------------------------------------------------------------------- the page's mechanics


@pytest.fixture
def untrained_run(tmp_path: Path) -> RunDir:
    from test_serve import write_model

    run = RunDir(tmp_path / "artifacts")
    write_model(run, "untrained1", seed=0)
    return run


def test_draw_pick_upload_clear(browser, untrained_run: RunDir, screenshots: Path, tmp_path: Path) -> None:
    with serving(untrained_run) as url:
        page = Page(browser, url)
        assert "untrained1" in page.tab.text_content("#card")

        answer = page.answer(lambda: page.draw(DIGIT_STROKES[7]))
        assert page.shown() == (str(answer["digit"]), str(answer["sum"])) and answer["number"] == 3
        with Image.open(io.BytesIO(page.sent)) as sent:  # the pad at half size (app.js: SENT_SIZE)
            assert (sent.format, sent.size) == ("PNG", (140, 140))
        assert (
            answer["input"] == image_file_in_mnist_form(io.BytesIO(page.sent), "pad").tolist()
        )  # predict's preparation
        assert page.seen().tolist() == answer["input"]
        assert (
            len(page.tab.query_selector_all("#digit-bars li")) == 10
            and len(page.tab.query_selector_all("#sum-bars li")) == 19
        )

        answer = page.answer(lambda: page.pick(8))  # a new number asks again at once
        assert answer["number"] == 8 and page.shown() == (str(answer["digit"]), str(answer["sum"]))

        def keyboard() -> None:  # the number picker by keyboard: the checked radio, then an arrow key
            page.tab.focus("#numbers input[value='8']")
            page.tab.keyboard.press("ArrowRight")

        answer = page.answer(keyboard)
        assert answer["number"] == 9 and page.shown()[1] == str(answer["sum"])
        page.tab.screenshot(path=str(screenshots / "untrained_drawn_seven.png"), full_page=True)

        image = Image.new("RGB", (200, 300), "white")
        ImageDraw.Draw(image).ellipse([50, 50, 150, 250], outline="black", width=18)
        upload = tmp_path / "zero.png"
        image.save(upload)
        answer = page.answer(lambda: page.tab.set_input_files("#file", str(upload)))
        assert answer["input"] == image_file_in_mnist_form(upload).tolist()
        assert page.seen().tolist() == answer["input"] and page.shown()[0] == str(answer["digit"])

        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        error = page.answer(lambda: page.tab.set_input_files("#file", str(bad)))
        assert "not an image" in error["error"] and "not an image" in page.tab.text_content("#status")
        assert page.shown() == ("–", "–")

        page.tab.click("#clear")
        assert page.shown() == ("–", "–") and "Cleared" in page.tab.text_content("#status")

        publish_model(untrained_run, b"half a model")  # unreadable: keep serving
        answer = page.answer(lambda: page.draw(DIGIT_STROKES[1]))
        assert answer["run_id"] == "untrained1" and "still serving run untrained1" in answer["problem"]
        page.tab.wait_for_selector("#problem:not([hidden])")
        assert "not a valid safetensors file" in page.tab.text_content("#problem")

        page.tab.set_viewport_size({"width": 390, "height": 844})  # a phone
        assert page.tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.tab.screenshot(path=str(screenshots / "untrained_phone.png"), full_page=True)
        assert page.foreign_requests() == []
        page.tab.close()


# --------------------------------------------------------------------------- reading drawn digits


@pytest.fixture(scope="module")
def mnist_run(shared_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """The cpu preset trained on the real MNIST, evaluated on val and plotted (for the run card)."""
    root = tmp_path_factory.mktemp("mnist-run")
    data, artifacts = root / "data", root / "artifacts"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv(MNIST_DIR_ENV, raising=False)
        assert _main("prepare", "--mnist-dir", shared_mnist, "--data", data) == 0
        assert _main("train", "--preset", "cpu", "--cpu", "--data", data, "--artifacts", artifacts) == 0
        assert _main("evaluate", "--split", "val", "--cpu", "--data", data, "--artifacts", artifacts) == 0
        assert _main("plot", "--data", data, "--artifacts", artifacts) == 0
    return RunDir(artifacts)


def test_drawn_digits_are_read_right(browser, mnist_run: RunDir, screenshots: Path) -> None:
    with serving(mnist_run) as url:
        page = Page(browser, url)
        read, seen = {}, []
        for digit, strokes in DIGIT_STROKES.items():
            page.tab.click("#clear")
            number = (digit * 7 + 3) % 10
            page.pick(number)
            answer = page.answer(lambda strokes=strokes: page.draw(strokes))
            assert page.shown() == (str(answer["digit"]), str(answer["sum"]))
            assert page.bar_shares("digit-bars") == pytest.approx(answer["digit_probabilities"], abs=0.02)
            assert page.bar_shares("sum-bars") == pytest.approx(answer["sum_probabilities"], abs=0.02)
            read[digit] = (answer["digit"], answer["sum"] - number)
            seen.append(page.seen())
            page.tab.screenshot(path=str(screenshots / f"drawn_{digit}.png"), full_page=True)
        Image.fromarray(np.concatenate(seen, axis=1)).resize((280 * 10, 28 * 10), Image.NEAREST).save(
            screenshots / "drawn_model_inputs.png"
        )
        (screenshots / "drawn_read.json").write_text(
            json.dumps({digit: {"digit": got, "sum_minus_number": total} for digit, (got, total) in read.items()})
        )
        digits_right = [digit for digit, (got, _) in read.items() if got == digit]
        sums_right = [digit for digit, (_, got) in read.items() if got == digit]
        assert len(digits_right) >= MIN_READ_RIGHT, read
        assert len(sums_right) >= MIN_READ_RIGHT, read
        card = page.tab.text_content("#card")
        assert "lean" in card and "val accuracy" in card and "not evaluated" in card  # val evaluated, test not
        assert page.tab.locator("#plots img").count() >= 3
        assert page.foreign_requests() == []
        page.tab.close()
