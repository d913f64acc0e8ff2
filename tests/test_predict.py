"""Image files → MNIST-style 28 x 28 digits, and predictions from them."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_startup import python
from torch import nn

from conftest import PNG_MAGIC, assert_one_line_error
from mnistsum_cli.data.images import MAX_PIXELS, greyscale, image_file_in_mnist_form, load_image, opaque, to_mnist
from mnistsum_cli.data.tensors import SplitTensors
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.evaluation.predict import predict_digits
from mnistsum_cli.training import inference
from mnistsum_cli.training.models import build_model

# A "7" with a crossbar, in a unit box (x, y): asymmetric, so a flip or a bad centring shows.
SEVEN = [(0.1, 0.05), (0.9, 0.05), (0.45, 0.95)]
CROSSBAR = [(0.35, 0.5), (0.85, 0.5)]


def draw_seven(size: tuple[int, int], box: tuple[int, int, int, int], mode: str, ink, paper) -> Image.Image:
    """A thick "7" filling `box` (x0, y0, x1, y1) on a `size` (w, h) canvas."""
    image = Image.new(mode, size, paper)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    width = max(2, round(min(x1 - x0, y1 - y0) / 7))
    for stroke in (SEVEN, CROSSBAR):
        points = [(x0 + x * (x1 - x0), y0 + y * (y1 - y0)) for x, y in stroke]
        draw.line(points, fill=ink, width=width, joint="curve")
    return image


def centre_of_mass(image: np.ndarray) -> np.ndarray:
    weights = image.astype(np.float64)
    ys, xs = np.indices(weights.shape)
    return np.array([(ys * weights).sum(), (xs * weights).sum()]) / weights.sum()


def ink_box_side(image: np.ndarray, threshold: int = 64) -> int:
    rows, cols = np.nonzero(image > threshold)
    return max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def assert_mnist_like(digit: np.ndarray) -> None:
    assert digit.dtype == np.uint8 and digit.shape == (28, 28)
    border = np.concatenate([digit[:3].ravel(), digit[-3:].ravel(), digit[:, :3].ravel(), digit[:, -3:].ravel()])
    assert border.mean() < 10, "the background should be black"
    assert digit.max() == 255, "the contrast should be stretched to the full range"
    assert np.abs(centre_of_mass(digit) - 14).max() <= 1.5
    assert 18 <= ink_box_side(digit) <= 22


def _rgb_black_on_white() -> Image.Image:
    return draw_seven((600, 400), (200, 60, 420, 360), "RGB", (0, 0, 0), (255, 255, 255))


def _rgb_blue_ink_on_grey_paper() -> Image.Image:
    return draw_seven((300, 300), (100, 40, 220, 260), "RGB", (30, 40, 120), (190, 185, 170))


def _small_grey_white_on_black() -> Image.Image:
    return draw_seven((40, 30), (12, 4, 30, 26), "L", 255, 0)


def _rgba_transparent_background() -> Image.Image:
    # The transparent pixels are black under their alpha: flattening must use white, not them.
    return draw_seven((200, 200), (50, 30, 150, 170), "RGBA", (0, 0, 0, 255), (0, 0, 0, 0))


def _la_transparent_background() -> Image.Image:
    return draw_seven((120, 160), (20, 20, 100, 140), "LA", (0, 255), (0, 0))


def _palette_with_transparency() -> Image.Image:
    image = draw_seven((150, 150), (30, 30, 110, 120), "P", 1, 0)
    image.putpalette([0, 0, 0, 20, 20, 20] + [0] * 762)
    image.info["transparency"] = 0  # index 0 (black) is the transparent background
    return image


def _sixteen_bit_grey() -> Image.Image:
    image = draw_seven((90, 90), (20, 10, 70, 80), "I;16", 60000, 2000)
    assert image.mode == "I;16"
    return image


def _off_centre() -> Image.Image:
    return draw_seven((500, 500), (10, 380, 70, 490), "L", 0, 255)


def _wide_digit() -> Image.Image:
    # Wider than tall: the width becomes 20 px, the height shrinks with it.
    return draw_seven((400, 200), (20, 60, 380, 140), "L", 0, 255)


FORMS: dict[str, Callable[[], Image.Image]] = {
    "rgb-black-on-white": _rgb_black_on_white,
    "rgb-blue-on-grey": _rgb_blue_ink_on_grey_paper,
    "small-white-on-black": _small_grey_white_on_black,
    "rgba-transparent": _rgba_transparent_background,
    "la-transparent": _la_transparent_background,
    "palette-transparent": _palette_with_transparency,
    "16-bit-grey": _sixteen_bit_grey,
    "off-centre": _off_centre,
    "wide": _wide_digit,
}
TRANSPARENT = ["rgba-transparent", "la-transparent", "palette-transparent"]
JPEG_FORMS = [form for form, make in FORMS.items() if make().mode in ("RGB", "L")]  # no alpha, no 16 bits
CASES = [(form, ".png") for form in FORMS] + [(form, ".jpg") for form in JPEG_FORMS]


@pytest.mark.parametrize("form, suffix", CASES)
def test_to_mnist_makes_mnist_like_digits(tmp_path: Path, form: str, suffix: str) -> None:
    image = FORMS[form]()
    path = _save(image, tmp_path / f"{form}{suffix}")
    grey = load_image(path)
    assert grey.dtype == np.float32 and grey.shape == (image.height, image.width)
    assert 0.0 <= grey.min() and grey.max() <= 1.0
    assert_mnist_like(to_mnist(grey))


@pytest.mark.parametrize("form", TRANSPARENT)
def test_transparent_background_is_white(tmp_path: Path, form: str) -> None:
    grey = load_image(_save(FORMS[form](), tmp_path / f"{form}.png"))
    assert grey[0, 0] == 1.0 and grey.min() < 0.1


def composited_on_white(image: Image.Image) -> np.ndarray:
    """The general recipe: any image onto white paper, then luma."""
    rgba = image.convert("RGBA")
    grey = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("L")
    return np.asarray(grey, dtype=np.float32) / 255.0


@pytest.mark.parametrize("form", [form for form in FORMS if form != "16-bit-grey"])
@pytest.mark.parametrize("alpha", ["as drawn", "opaque alpha band"])
def test_greyscale_of_an_opaque_image_skips_compositing_and_gives_the_same(form: str, alpha: str) -> None:
    """The fast path for images without transparency (a drawing pad, a photo) is a shortcut,
    not a second recipe: it gives what compositing gives, to the bit."""
    image = FORMS[form]()
    if alpha == "opaque alpha band":
        image = image.convert("LA" if image.mode in ("L", "LA") else "RGBA")
        image.putalpha(255)
    assert opaque(image) == (form not in TRANSPARENT or alpha == "opaque alpha band")
    assert np.array_equal(greyscale(image), composited_on_white(image))


@pytest.mark.parametrize("mode", ["L", "RGB", "P"])
def test_a_colour_key_is_transparency_too(mode: str) -> None:
    """PNG's tRNS chunk: one colour (here the black background) is transparent, with no alpha
    band; it must become white paper, not black ink."""
    image = draw_seven((80, 80), (20, 10, 60, 70), mode, 1 if mode == "P" else (200 if mode == "L" else (200,) * 3), 0)
    if mode == "P":
        image.putpalette([0, 0, 0, 200, 200, 200] + [0] * 762)
    image.info["transparency"] = 0 if mode in ("L", "P") else (0, 0, 0)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    reread = Image.open(buffer)
    assert not opaque(reread)
    grey = greyscale(reread)
    assert np.array_equal(grey, composited_on_white(reread)) and grey[0, 0] == 1.0


def test_sixteen_bit_grey_keeps_its_levels(tmp_path: Path) -> None:
    grey = load_image(_save(_sixteen_bit_grey(), tmp_path / "deep.png"))
    assert grey.min() == pytest.approx(2000 / 65535) and grey.max() == pytest.approx(60000 / 65535)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = _rgb_black_on_white()
    exif = Image.Exif()
    exif[0x0112] = 3  # Orientation: rotated 180 degrees
    image.save(tmp_path / "rotated.png", exif=exif)
    upright = load_image(_save(image, tmp_path / "upright.png"))
    assert np.array_equal(load_image(tmp_path / "rotated.png"), upright[::-1, ::-1])


def test_inverted_input_gives_the_same_digit(tmp_path: Path) -> None:
    grey = load_image(_save(_rgb_black_on_white(), tmp_path / "seven.png"))
    assert np.array_equal(to_mnist(grey), to_mnist(1.0 - grey))


def test_inverted_file_gives_nearly_the_same_digit(tmp_path: Path) -> None:
    box = (100, 50, 260, 290)
    dark_on_light = draw_seven((360, 340), box, "L", 0, 255)
    light_on_dark = draw_seven((360, 340), box, "RGB", (250, 250, 250), (10, 10, 10))
    first = to_mnist(load_image(_save(dark_on_light, tmp_path / "a.jpg")))
    second = to_mnist(load_image(_save(light_on_dark, tmp_path / "b.png")))
    assert np.abs(first.astype(int) - second.astype(int)).mean() < 3


def test_scale_and_position_do_not_matter(tmp_path: Path) -> None:
    big = draw_seven((800, 800), (500, 100, 700, 380), "L", 0, 255)
    small = draw_seven((60, 60), (5, 5, 45, 55), "L", 0, 255)
    big, small = (to_mnist(load_image(_save(image, tmp_path / f"{i}.png"))) for i, image in enumerate((big, small)))
    assert np.abs(big.astype(int) - small.astype(int)).mean() < 8


# --------------------------------------------------------------------------- errors


def _text_as_png(path: Path) -> Path:
    return _write(path / "notes.png", b"this is not an image\n")


def _empty_file(path: Path) -> Path:
    return _write(path / "empty.png", b"")


def _truncated_png(path: Path) -> Path:
    full = _save(_rgb_black_on_white(), path / "full.png").read_bytes()
    return _write(path / "truncated.png", full[: len(full) // 2])


def _truncated_jpeg(path: Path) -> Path:
    full = _save(_rgb_black_on_white(), path / "full.jpg").read_bytes()
    return _write(path / "truncated.jpg", full[: len(full) // 3])


def _missing(path: Path) -> Path:
    return path / "missing.png"


def _folder(path: Path) -> Path:
    folder = path / "folder.png"
    folder.mkdir()
    return folder


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _animated_gif(path: Path) -> Path:
    frames = [Image.new("L", (32, 32), value) for value in (0, 255)]
    frames[0].save(path / "blink.gif", save_all=True, append_images=frames[1:], duration=100)
    return path / "blink.gif"


UNREADABLE = [_text_as_png, _empty_file, _truncated_png, _truncated_jpeg, _missing, _folder, _animated_gif]


@pytest.mark.parametrize("make", UNREADABLE, ids=lambda make: make.__name__[1:])
def test_unreadable_files_raise_a_one_line_error(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    path = make(tmp_path)
    with pytest.raises(MnistsumError) as caught:
        load_image(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert type(caught.value) is MnistsumError  # not an exception of PIL's dressed up


@pytest.mark.parametrize(
    "image",
    [Image.new("L", (64, 64), 255), Image.new("RGB", (30, 50), (0, 0, 0)), Image.new("L", (28, 28), 128)],
    ids=["white", "black", "grey"],
)
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_blank_image_has_no_digit(tmp_path: Path, image: Image.Image, suffix: str) -> None:
    with pytest.raises(MnistsumError, match="no digit"):
        to_mnist(load_image(_save(image, tmp_path / f"blank{suffix}")))


def test_blank_with_faint_noise_has_no_digit() -> None:
    noise = np.random.default_rng(0).uniform(0.98, 1.0, size=(50, 50)).astype(np.float32)
    with pytest.raises(MnistsumError, match="no digit"):
        to_mnist(noise)


# --------------------------------------------------------------------------- real MNIST


def test_real_mnist_digits_survive_a_round_trip(shared_mnist: Path, tmp_path: Path) -> None:
    """MNIST digits are already in MNIST form: saved as PNG and read back, they should barely
    change. Rounding the centre of mass to a whole pixel may shift a digit by one pixel."""
    from torchvision.datasets import MNIST

    images = MNIST(str(shared_mnist), train=False, download=False).data[:200].numpy().astype(int)
    unchanged = 0
    for index, original in enumerate(images):
        again = to_mnist(load_image(_save(Image.fromarray(original.astype(np.uint8)), tmp_path / f"{index}.png")))
        shifted = [np.roll(again.astype(int), (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert min(np.abs(candidate - original).mean() for candidate in shifted) < 1.5, index
        assert np.abs(centre_of_mass(again) - centre_of_mass(original)).max() <= 1.0, index
        unchanged += np.abs(again - original).mean() < 1.0
    assert unchanged >= 0.95 * len(images)


# --------------------------------------------------------------------------- predictions


def test_predict_digits_returns_plain_json_values() -> None:
    torch.manual_seed(0)
    model = build_model("fastnet-small").train()
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    numbers = torch.tensor([0, 3, 9, 5, 1])
    rows = predict_digits(model, images, numbers, torch.device("cpu"))
    assert model.training, "the model's mode should be restored"
    assert len(rows) == 5
    for row in rows:
        assert set(row) == {"digit", "sum", "digit_confidence", "sum_confidence"}
        assert type(row["digit"]) is int and 0 <= row["digit"] <= 9
        assert type(row["sum"]) is int and 0 <= row["sum"] <= 18
        for key in ("digit_confidence", "sum_confidence"):
            assert type(row[key]) is float and 0.0 < row[key] <= 1.0
        assert row["digit_confidence"] >= 0.1 - 1e-6 and row["sum_confidence"] >= 1 / 19 - 1e-6  # a softmax max
    assert json.loads(json.dumps(rows)) == rows


class Spike(nn.Module):
    """Digit logits peaked at (number + 3) % 10 and sum logits at the number + 9, scaled by how
    bright the first image pixel is; records what it was given."""

    def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen = images
        height = 1.0 + images[:, 0, 0, 0, None]
        digit = nn.functional.one_hot((numbers + 3) % 10, 10) * height
        return digit, nn.functional.one_hot(numbers + 9, 19) * 2 * height


def test_predict_digits_reads_the_right_heads() -> None:
    images = torch.zeros((3, 28, 28), dtype=torch.uint8)
    images[1, 0, 0] = 255
    numbers = torch.tensor([0, 8, 4])
    model = Spike()
    rows = predict_digits(model, images, numbers, torch.device("cpu"))
    assert model.seen.shape == (3, 1, 28, 28) and model.seen.dtype == torch.float32
    assert model.seen[0].max() < 0 < model.seen[1, 0, 0, 0]  # normalised with MNIST's mean and std
    assert [(row["digit"], row["sum"]) for row in rows] == [(3, 9), (1, 17), (7, 13)]
    for row, image in zip(rows, model.seen):
        height = 1.0 + float(image[0, 0, 0])
        assert row["digit_confidence"] == pytest.approx(np.exp(height) / (np.exp(height) + 9))
        assert row["sum_confidence"] == pytest.approx(np.exp(2 * height) / (np.exp(2 * height) + 18))


def test_predict_digits_from_an_image_file(tmp_path: Path) -> None:
    digit = to_mnist(load_image(_save(_rgb_black_on_white(), tmp_path / "seven.png")))
    model = build_model("fastnet-small")
    rows = predict_digits(model, torch.from_numpy(digit)[None], torch.tensor([4]), torch.device("cpu"))
    assert len(rows) == 1 and 0 <= rows[0]["sum"] <= 18


def test_predict_digits_rejects_numbers_out_of_range() -> None:
    images = torch.zeros((2, 28, 28), dtype=torch.uint8)
    with pytest.raises(MnistsumError, match="0-9"):
        predict_digits(build_model("fastnet-small"), images, torch.tensor([3, 10]), torch.device("cpu"))


def test_a_split_and_a_batch_of_images_get_the_same_answer_through_the_one_inference_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`evaluate` (inference.predict over a split) and `predict`/`serve` (head_probabilities on
    images) both run the model through inference.head_logits, and agree on the same rows."""
    torch.manual_seed(0)
    model = build_model("fastnet-small").train()
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    numbers, digits = torch.tensor([0, 3, 9, 5, 1, 7]), torch.tensor([1, 2, 3, 4, 5, 6])
    split = SplitTensors(images, digits, numbers, digits + numbers)
    calls = []
    original = inference.head_logits
    monkeypatch.setattr(inference, "head_logits", lambda *args: calls.append(len(args[1])) or original(*args))
    over_split = inference.predict(model, split, batch_size=4)
    digit_probs, sum_probs = inference.head_probabilities(model, images, numbers, torch.device("cpu"))
    assert calls == [4, 2, 6] and model.training
    assert torch.allclose(over_split.digit_probs, digit_probs) and torch.allclose(over_split.sum_probs, sum_probs)
    rows = predict_digits(model, images, numbers, torch.device("cpu"))
    assert [row["digit"] for row in rows] == over_split.digit.tolist()
    assert [row["sum"] for row in rows] == over_split.sum.tolist()


def test_preparing_an_image_and_predicting_load_no_torch_until_a_model_runs(tmp_path: Path) -> None:
    path = _save(_rgb_black_on_white(), tmp_path / "seven.png")
    code = (
        "import sys\nfrom pathlib import Path\nfrom mnistsum_cli.data.images import image_file_in_mnist_form\n"
        "import mnistsum_cli.evaluation.predict\n"
        f"assert image_file_in_mnist_form(Path({str(path)!r})).shape == (28, 28)\n"
        "print('LOADED:', *[name for name in ('torch', 'torchvision', 'matplotlib') if name in sys.modules])"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "LOADED:"


# --------------------------------------------------------------------------- what is not a plain, sane image file


@pytest.fixture
def no_hang():
    """Fail (rather than hang the suite) if the test blocks for 20 s."""

    def timeout(signum, frame):
        raise TimeoutError("blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path, no_hang) -> None:
    fifo = tmp_path / "digit.png"
    os.mkfifo(fifo)
    with pytest.raises(MnistsumError, match=r"digit.png: not a regular file \(a pipe or a device\), not an image$"):
        load_image(fifo)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height, all black: a few kB that decode to width*height pixels."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        PNG_MAGIC
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", data)
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("width, height", [(13_000, 13_000), (4097, 4096), (8193, 2049)])
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path: Path, width: int, height: int) -> None:
    path = _write(tmp_path / "huge.png", _png_header_only(width, height))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MnistsumError, match=rf"huge.png: over 4096 x 4096 pixels.*\({width} x {height}\)"):
            load_image(path)
    assert not caught, [str(warning.message) for warning in caught]


def test_an_image_at_the_pixel_limit_is_read(tmp_path: Path) -> None:
    assert MAX_PIXELS == 4096 * 4096
    assert load_image(_write(tmp_path / "big.png", _png_header_only(4096, 4096))).shape == (4096, 4096)


def test_predict_on_a_decompression_bomb(workdir: Path, run_cli) -> None:
    _write(workdir / "bomb.png", _png_header_only(13_000, 13_000))
    code, out, err = run_cli("predict", "bomb.png", "--number", 3, "--cpu")
    assert code == 1
    assert "over 4096 x 4096 pixels" in assert_one_line_error(err, out)
    assert "DecompressionBomb" not in err


def test_file_names_that_are_not_utf8_in_json(workdir: Path, run_cli) -> None:
    name = os.fsdecode(b"caf\xe9 7.png")  # Latin-1 bytes: Python holds the \xe9 as a lone surrogate
    _save(_rgb_black_on_white(), workdir / name)
    code, out, err = run_cli("predict", name, "--number", 3, "--json", "--cpu")
    assert code == 0, err
    out.encode("utf-8")  # no lone surrogate escapes into the output
    assert "\\udc" not in out
    assert json.loads(out)["image"] == "caf\\xe9 7.png"
    code, out, err = run_cli("predict", name, "--number", 3, "--cpu")
    assert code == 0, err
    assert "caf\\xe9 7.png" in out


# --------------------------------------------------------------------------- the formats read


def test_predict_help_names_the_formats_it_reads(run_cli) -> None:
    code, out, _ = run_cli("predict", "--help")
    assert code == 0 and "PNG, JPEG, WebP, TIFF, BMP or GIF files" in " ".join(out.split())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF"])
def test_each_format_the_help_names_is_read(tmp_path: Path, fmt: str) -> None:
    image = draw_seven((90, 120), (10, 10, 80, 110), "L", 0, 255)
    image.save(tmp_path / "seven", fmt)
    assert_mnist_like(image_file_in_mnist_form(tmp_path / "seven"))


@pytest.mark.parametrize("fmt", ["TGA", "PCX", "ICO", "PPM", "SGI"])
def test_a_format_the_help_does_not_name_is_refused(tmp_path: Path, fmt: str) -> None:
    """PIL reads these too: `predict` tries only the decoders it names."""
    draw_seven((64, 64), (8, 8, 56, 56), "L", 0, 255).save(tmp_path / "seven", fmt)
    with pytest.raises(MnistsumError, match=r"not an image \(expected PNG, JPEG, WebP, TIFF, BMP or GIF\)$"):
        image_file_in_mnist_form(tmp_path / "seven")


def jpeg_with_damaged_exif() -> bytes:
    """A JPEG whose EXIF says Orientation 3, then a tag whose data lies past the end and an
    entry count larger than the entries there: PIL warns "Corrupt EXIF data" and more."""
    exif = (
        b"Exif\0\0II*\0\x08\0\0\0"  # a little-endian TIFF header, the first directory at 8
        + b"\x05\0"  # 5 entries, of which 2 follow
        + b"\x12\x01\x03\0\x01\0\0\0\x03\0\0\0"  # Orientation (0x0112), SHORT, 1: 3
        + b"\x0f\x01\x02\0\xff\0\0\0\x40\0\0\0"  # Make (0x010f), ASCII, 255 bytes at 64: past the end
    )
    buffer = io.BytesIO()
    draw_seven((90, 120), (10, 10, 80, 110), "L", 0, 255).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def test_damaged_exif_is_no_warning_on_stderr(workdir: Path) -> None:
    """PIL's warnings about damaged metadata printed raw (two lines each, with PIL's source
    line); the pixels are read all the same: nothing on stderr."""
    (workdir / "seven.jpg").write_bytes(jpeg_with_damaged_exif())
    with warnings.catch_warnings(record=True) as caught:  # PIL does warn about this file
        warnings.simplefilter("always")
        Image.open(io.BytesIO(jpeg_with_damaged_exif())).getexif()
    assert any("EXIF" in str(warning.message) for warning in caught)
    done = subprocess.run(
        [sys.executable, "-m", "mnistsum_cli", "predict", "seven.jpg", "--number", "3", "--cpu", "--json"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONWARNINGS": "default"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["number"] == 3
