"""Safetensors files (weights, checkpoints): JSON-encoded metadata, and reads that check the file's kind and turn any damage into a MnistsumError."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from mnistsum_cli.errors import MnistsumError, first_line
from mnistsum_cli.store import commit


def safetensors_bytes(tensors: dict, metadata: dict[str, Any]) -> bytes:
    """A safetensors file of `tensors` with JSON-encoded metadata values (safetensors metadata
    is str -> str), in memory: a commit writes it (see store.Change.write). No NaN or infinity,
    as in every JSON this package writes (store.json_bytes)."""
    from safetensors.torch import save

    encoded = {key: json.dumps(value, allow_nan=False) for key, value in metadata.items()}
    return save({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, metadata=encoded)


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, Any]) -> None:
    """Replace one safetensors file, as a commit of its folder."""
    data = safetensors_bytes(tensors, metadata)
    with commit(path.parent) as change:
        change.write(path.name, data)


def read_safetensors(
    path: Path, stage: str, expected_format: str, metadata_only: bool = False
) -> tuple[dict, dict[str, Any]]:
    """Load tensors (none when metadata_only) and decoded metadata, checking the file's kind."""
    from safetensors import safe_open

    if not path.exists():
        raise MnistsumError(f"{path} not found: run `mnistsum {stage}` first")
    try:
        # numpy, not torch, when no tensor is wanted: `status` and an up-to-date `run` need no torch
        with safe_open(str(path), framework="numpy" if metadata_only else "pt") as handle:
            raw = handle.metadata() or {}
            tensors = {} if metadata_only else {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except Exception as error:  # safetensors raises several unrelated types on damage
        raise _not_safetensors(path, stage, error) from None
    return tensors, _checked_kind(metadata, path, stage, expected_format)


def decode_safetensors(data: bytes, path: Path, stage: str, expected_format: str) -> tuple[dict, dict[str, Any]]:
    """read_safetensors on bytes already read from `path` (one read: a reader that must see one
    consistent version of a file that writers replace)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as error:  # as above
        raise _not_safetensors(path, stage, error) from None
    return tensors, safetensors_metadata(data, path, stage, expected_format)


def safetensors_metadata(data: bytes, path: Path, stage: str, expected_format: str) -> dict[str, Any]:
    """The decoded metadata of a safetensors file's bytes, from its header alone (no torch:
    `serve --runtime onnx`), checking the file's kind."""
    try:
        (header_size,) = struct.unpack("<Q", data[:8])
        raw = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except Exception as error:  # struct / JSON errors of the header
        raise _not_safetensors(path, stage, error) from None
    return _checked_kind(metadata, path, stage, expected_format)


def _not_safetensors(path: Path, stage: str, error: BaseException) -> MnistsumError:
    return MnistsumError(f"{path} is not a valid safetensors file ({first_line(error)}): rerun `mnistsum {stage}`")


def _checked_kind(metadata: dict[str, Any], path: Path, stage: str, expected_format: str) -> dict[str, Any]:
    if metadata.get("format") != expected_format:
        raise MnistsumError(f"{path} is not a {expected_format} file: rerun `mnistsum {stage}`")
    return metadata
