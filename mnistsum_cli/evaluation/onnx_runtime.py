"""Running model.onnx on onnxruntime, without torch: what `predict --runtime onnx` and
`serve --runtime onnx` answer with.

The graph (written by export.py) takes MNIST-form pixels, uint8 [N, 28, 28] as `image_file_in_mnist_form`
makes them, and int64 numbers [N]; it normalises the pixels itself, so a caller needs numpy
alone. A model.onnx is used only when it was exported from the model.safetensors beside it (its
metadata records that file's hash): a stale or foreign one is refused in one line, never run.
Only onnxruntime and numpy are imported here, inside the functions that need them, and the
metadata is read without either (`onnx_metadata`), so `status` stays light.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from mnistsum_cli.errors import MnistsumError, first_line
from mnistsum_cli.store.diskfiles import Missing, read_file
from mnistsum_cli.store.fingerprints import fingerprint_bytes
from mnistsum_cli.store.paths import NUM_DIGITS, NUM_SUMS, ONNX_FORMAT, RunDir
from mnistsum_cli.store.reads import read_consistently
from mnistsum_cli.store.schemas import MODEL_META, ONNX_META

if TYPE_CHECKING:
    import numpy as np

INPUT_NAMES = ("images", "numbers")
OUTPUT_NAMES = ("digit_probabilities", "sum_probabilities", "digit_logits", "sum_logits")
INPUTS_TEXT = (
    "images: uint8 [N, 28, 28], MNIST form (white digit on black, 0-255, as `mnistsum predict` prepares it; "
    "normalised inside the graph); numbers: int64 [N], 0-9"
)
OUTPUTS_TEXT = (
    f"digit_probabilities: float32 [N, {NUM_DIGITS}]; sum_probabilities: float32 [N, {NUM_SUMS}] (sums 0-18); "
    "digit_logits, sum_logits: the same before softmax"
)
EXTRA_MODULES = ("onnx", "onnxscript", "onnxruntime")  # the `onnx` extra
GRAPH_FIELD = 7  # ModelProto.graph: the nodes and the weights
METADATA_FIELD = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key = 1, value = 2}


@contextmanager
def onnx_extra(command: str) -> Iterator[None]:
    """Turn a missing module of the `onnx` extra, imported in the block, into one line saying how to install it."""
    try:
        yield
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in EXTRA_MODULES:
            raise
        raise MnistsumError(
            f"`mnistsum {command}` needs the onnx extra ({error.name} is missing): pip install 'mnistsum[onnx]'"
        ) from None


def require_extra(command: str) -> None:
    """Import the whole onnx extra now, so that a missing part of it is one line before any
    work (torch's exporter imports onnxscript where its absence would be a traceback)."""
    with onnx_extra(command):
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401


# --------------------------------------------------------------------------- metadata


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("cut short")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message: an int, or the bytes of a
    length-delimited field (a nested message is skipped over, not parsed)."""
    at = 0
    while at < len(data):
        tag, at = _varint(data, at)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, at = int.from_bytes(data[at : at + size], "little"), at + size
        elif wire == 2:
            size, at = _varint(data, at)
            value, at = data[at : at + size], at + size
        else:
            raise ValueError(f"wire type {wire}")
        if at > len(data) or number == 0:
            raise ValueError("cut short")
        yield number, wire, value


def onnx_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX model's bytes, checked against ONNX_META, after checking that
    the graph (weights included) is the one exported: its hash is recorded in the metadata. Read
    from the protobuf wire format directly (the graph is hashed, not decoded), so that `status`
    and a refused file need neither onnx nor onnxruntime."""
    try:
        fields = [(number, value) for number, wire, value in _fields(data) if wire == 2]
        meta = {}
        for entry in (value for number, value in fields if number == METADATA_FIELD):
            parts = {number: value for number, wire, value in _fields(entry) if wire == 2}
            meta[parts.get(1, b"").decode()] = parts.get(2, b"").decode()
    except (ValueError, UnicodeDecodeError) as error:
        raise MnistsumError(f"{path} is not a valid ONNX file ({first_line(error)}): rerun `mnistsum export`") from None
    if meta.get("format") != ONNX_FORMAT:
        raise MnistsumError(f"{path} is not a {ONNX_FORMAT} file: rerun `mnistsum export`")
    ONNX_META.check(meta, path)
    if graph_fingerprint(data) != meta["graph_sha256"]:
        raise MnistsumError(f"{path} is damaged (its graph is not the one exported): rerun `mnistsum export`")
    return meta


def graph_fingerprint(data: bytes) -> Optional[str]:
    """The hash (16 hex digits) of the graph field of an ONNX model's bytes; None without one."""
    graphs = [value for number, wire, value in _fields(data) if number == GRAPH_FIELD and wire == 2]
    return hashlib.sha256(graphs[0]).hexdigest()[:16] if len(graphs) == 1 else None


def stale_reason(meta: dict[str, str], model_sha256: Optional[str], folder: RunDir) -> Optional[str]:
    """Why a model.onnx with metadata `meta` is not the export of the model.safetensors whose hash
    is `model_sha256` (None: no such file), or None when it is."""
    if model_sha256 is None:
        return f"{folder.model} is missing"
    if meta["model_sha256"] != model_sha256:
        return f"exported from another model.safetensors ({meta['model_sha256']}, now {model_sha256})"
    return None


# --------------------------------------------------------------------------- running it


@dataclass(frozen=True)
class OnnxModel:
    """An onnxruntime session of a checked model.onnx, and its metadata."""

    session: Any
    meta: dict[str, str]

    def probabilities(self, images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Digit [N, 10] and sum [N, 19] probabilities (float32) for uint8 images [N, 28, 28] and
        numbers [N] in 0-9: the contract of inference.head_probabilities, in numpy."""
        import numpy as np

        from mnistsum_cli.data.images import check_model_inputs

        images, numbers = np.ascontiguousarray(images, dtype=np.uint8), np.asarray(numbers, dtype=np.int64)
        check_model_inputs(images, numbers)
        digit, total = self.session.run(OUTPUT_NAMES[:2], {"images": images, "numbers": numbers})
        return digit, total


def onnx_session(data: bytes, path: Path, threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session of an ONNX model's bytes; `threads` caps its intra-op threads
    (serve: one image per request). What onnxruntime cannot load is one line."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are not the user's business
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own unrelated types (InvalidProtobuf, Fail, ...)
        raise MnistsumError(
            f"{path}: onnxruntime {onnxruntime.__version__} cannot run it ({first_line(error)}): "
            "rerun `mnistsum export` (a lower --opset, or a newer onnxruntime)"
        ) from None


def read_onnx_files(folder: RunDir) -> tuple[bytes, Optional[str]]:
    """model.onnx's bytes and the hash of the model.safetensors beside it (None when missing), as
    one commit left them (store.read_consistently), each a checked file within its cap."""

    def read() -> tuple[bytes, Optional[str]]:
        data = read_file(folder.onnx, ONNX_META.max_bytes, "export")
        try:
            return data, fingerprint_bytes(read_file(folder.model, MODEL_META.max_bytes, "train"))
        except Missing:
            return data, None

    return read_consistently(folder.root, read)


def current_onnx_model(
    data: bytes, model_sha256: Optional[str], folder: RunDir, threads: Optional[int] = None
) -> OnnxModel:
    """The session of model.onnx's bytes `data` when it is the export of the current model
    (hash `model_sha256`); a stale, foreign or damaged file is one line, checked before
    onnxruntime is asked to load it."""
    meta = onnx_metadata(data, folder.onnx)
    reason = stale_reason(meta, model_sha256, folder)
    if reason is not None:
        raise MnistsumError(f"{folder.onnx} is stale ({reason}): rerun `mnistsum export`")
    return OnnxModel(onnx_session(data, folder.onnx, threads), meta)


def load_onnx_model(folder: RunDir, threads: Optional[int] = None) -> OnnxModel:
    """The run's model.onnx, checked to be the export of its model.safetensors."""
    data, model_sha256 = read_onnx_files(folder)
    return current_onnx_model(data, model_sha256, folder, threads)
