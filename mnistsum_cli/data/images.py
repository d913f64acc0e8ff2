"""Image files → MNIST form: load a PNG, JPEG, WebP, TIFF, BMP or GIF (paths.IMAGE_FILE_FORMATS)
and reshape it the way MNIST was made, as uint8 [28, 28]; and the input contract of the model
that form feeds (check_model_inputs), which both runtimes check.

MNIST digits are white on black, scaled so the longer side of the ink is 20 px (aspect ratio
kept, antialiased) and placed in a 28 x 28 field with their centre of mass at pixel (14, 14).
numpy and PIL alone, never torch: `predict` on image files refuses a bad one before torch loads,
and `predict --runtime onnx` and `serve --runtime onnx` run without it. Imports the store and
the base modules.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.paths import IMAGE_FILE_FORMATS, formats_text

SIZE = 28  # the MNIST field
BOX = 20  # the longer side of the ink
CENTRE = 14  # where the ink's centre of mass goes, in pixel indices (as in MNIST)
MIN_CONTRAST = 0.05  # the least max - min grey (of 1) that can be a digit rather than noise
INK_THRESHOLD = 0.1  # ink bounding box: pixels above this fraction of the strongest ink
# The largest image read: 16.8 MP holds a 12 MP phone photo; a digit needs far less, and a
# larger image (PIL's warning starts at 89 MP) costs gigabytes to decode.
MAX_PIXELS = 4096 * 4096
MAX_PIXELS_TEXT = "4096 x 4096"


def open_image(file: BinaryIO, name: str, formats: tuple[str, ...] = IMAGE_FILE_FORMATS) -> Image.Image:
    """Decode an image from an open file (on disk or uploaded), refusing what is not an image,
    an animated image (which frame would be meant?) or one larger than MAX_PIXELS before
    decoding it; the EXIF rotation is applied. `formats` are the decoders tried; errors name
    `name`. The one place that decides which images are read. Damaged metadata (EXIF, stored
    as TIFF tags) makes PIL warn and skip it: the pixels are read all the same, so it is no
    error and not a line on stderr (PIL's warnings would print raw)."""
    too_large = f"{name}: over {MAX_PIXELS_TEXT} pixels, far more than a digit needs: scale it down"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # above 89 MP: MAX_PIXELS speaks instead
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")  # damaged EXIF
            image = Image.open(file, formats=formats)
            width, height = image.size  # from the header: nothing is decoded yet
            if width * height > MAX_PIXELS:
                raise MnistsumError(f"{too_large} ({width} x {height})")
            if getattr(image, "n_frames", 1) > 1:
                raise MnistsumError(f"{name}: an animated image ({image.n_frames} frames); give a single picture")
            image.load()
            return ImageOps.exif_transpose(image)  # phone photos: apply the EXIF rotation
    except UnidentifiedImageError:
        raise MnistsumError(f"{name}: not an image (expected {formats_text(formats)})") from None
    except Image.DecompressionBombError:  # PIL's own limit, above 179 MP, refuses in Image.open
        raise MnistsumError(too_large) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise MnistsumError(f"{name}: cannot read image ({str(error).strip() or type(error).__name__})") from None


def load_image(path: Path) -> np.ndarray:
    """Read an image file as greyscale float32 [H, W] in [0, 1]. Only a regular file: a FIFO
    or a device would block or never end (it is opened without blocking, then checked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MnistsumError(f"{path}: no such file") from None
    except PermissionError:
        raise MnistsumError(f"{path}: permission denied") from None
    except OSError as error:
        raise MnistsumError(f"{path}: cannot open ({error.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "is a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe or a device)"
        raise MnistsumError(f"{path}: {kind}, not an image")
    with os.fdopen(fd, "rb") as file, open_image(file, str(path)) as image:
        return greyscale(image)


def greyscale(image: Image.Image) -> np.ndarray:
    """Any PIL image → greyscale float32 [H, W] in [0, 1], transparency composited onto white."""
    if image.mode.startswith("I"):  # 16/32-bit greyscale: scale, as convert("L") would clip
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if opaque(image):  # a drawing pad or a photo: nothing to composite (and 5x cheaper than doing it)
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    rgba = image.convert("RGBA")  # also turns palette / colour-key transparency into alpha
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    grey = Image.alpha_composite(white, rgba).convert("L")
    return np.asarray(grey, dtype=np.float32) / 255.0


def opaque(image: Image.Image) -> bool:
    """Whether the image has no transparency at all: no palette or colour-key transparency, and
    an alpha band, if any, that is 255 everywhere."""
    if "transparency" in image.info or image.mode in ("P", "PA"):
        return False
    if image.mode in ("RGBA", "LA"):
        return image.getchannel("A").getextrema() == (255, 255)
    return image.mode in ("1", "L", "RGB")


def image_file_in_mnist_form(
    source: Union[Path, BinaryIO], name: Optional[str] = None, formats: tuple[str, ...] = IMAGE_FILE_FORMATS
) -> np.ndarray:
    """An image file or stream as the model's uint8 [28, 28] input: what `predict` and `serve`
    both feed the model, so the page shows exactly what the command line would see. Errors
    name the image (`name`, default the path)."""
    if isinstance(source, Path):
        name, grey = name or str(source), load_image(source)
    else:
        name = name or "image"
        with open_image(source, name, formats) as image:
            grey = greyscale(image)
    try:
        return to_mnist(grey)
    except MnistsumError as error:
        raise MnistsumError(f"{name}: {error}") from None


def _background(grey: np.ndarray) -> float:
    """The median of the border pixels (as np.median, whose NaN check imports numpy.ma: 40 ms
    of a `predict` process's start)."""
    border = np.sort(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]]))
    return float((border[(len(border) - 1) // 2] + border[len(border) // 2]) / 2)


def to_mnist(grey: np.ndarray) -> np.ndarray:
    """Greyscale [H, W] in [0, 1], either polarity → uint8 [28, 28] white-on-black, MNIST style."""
    low, high = float(grey.min()), float(grey.max())
    if high - low < MIN_CONTRAST:
        raise MnistsumError("no digit found: the image is blank")
    # in place, one new array: `serve` prepares a drawing per request
    ink = np.subtract(grey, low, dtype=np.float32)
    ink /= high - low
    if _background(ink) > 0.5:  # light background: dark ink on paper
        np.subtract(1.0, ink, out=ink)
    ink -= _background(ink)
    np.maximum(ink, 0.0, out=ink)
    peak = ink.max()
    if peak <= 0.0:
        raise MnistsumError("no digit found: nothing stands out from the background")
    ink /= peak

    strong = ink > INK_THRESHOLD
    rows, cols = np.flatnonzero(strong.any(axis=1)), np.flatnonzero(strong.any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = BOX / max(crop.shape)
    width, height = (max(1, round(side * scale)) for side in (crop.shape[1], crop.shape[0]))
    patch = np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.LANCZOS))
    patch = np.clip(patch, 0.0, None)  # Lanczos rings below zero next to strokes
    patch /= patch.max()

    ys, xs = np.indices(patch.shape)
    mass = patch.sum()
    top = int(np.clip(round(CENTRE - (ys * patch).sum() / mass), 0, SIZE - height))
    left = int(np.clip(round(CENTRE - (xs * patch).sum() / mass), 0, SIZE - width))
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    canvas[top : top + height, left : left + width] = patch
    return np.round(canvas * 255.0).astype(np.uint8)


def check_model_inputs(images: Any, numbers: Any) -> None:
    """Refuse model inputs that are not MNIST-form images [N, 28, 28] with numbers [N] in 0-9:
    the contract of both runtimes (inference.head_probabilities on torch tensors,
    onnx_runtime.OnnxModel on numpy arrays; either has .shape, comparisons and .any())."""
    if tuple(images.shape[1:]) != (SIZE, SIZE) or images.shape[0] != numbers.shape[0]:
        raise ValueError(
            f"expected images [N, 28, 28] and numbers [N], got {tuple(images.shape)} and {tuple(numbers.shape)}"
        )
    if ((numbers < 0) | (numbers > 9)).any():
        raise MnistsumError(f"numbers must be 0-9, got {numbers.tolist()}")
