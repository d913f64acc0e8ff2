"""Safetensors files (weights, checkpoints): JSON-encoded metadata, and reads that check the file's kind and turn any damage into a MnistsumError."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from mnistsum_cli.errors import MnistsumError, first_line
from mnistsum_cli.store.diskfiles import read_file
from mnistsum_cli.store.paths import CHECKPOINT_FORMAT, MODEL_FORMAT
from mnistsum_cli.store.schemas import CHECKPOINT_META, MODEL_META

SCHEMA_OF_FORMAT = {MODEL_FORMAT: MODEL_META, CHECKPOINT_FORMAT: CHECKPOINT_META}  # what each kind of file holds


def safetensors_bytes(tensors: dict, metadata: dict[str, Any]) -> bytes:
    """A safetensors file of `tensors` with JSON-encoded metadata values (safetensors metadata
    is str -> str), in memory: a commit writes it (transactions.Change.write). No NaN or
    infinity, as in every JSON this package writes (writes.json_bytes)."""
    from safetensors.torch import save

    encoded = {key: json.dumps(value, allow_nan=False) for key, value in metadata.items()}
    return save({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, metadata=encoded)


def read_safetensors(
    path: Path, stage: str, expected_format: str, metadata_only: bool = False
) -> tuple[dict, dict[str, Any]]:
    """Load tensors (none when metadata_only) and decoded metadata, checking the file's kind. The
    file is read once, as a checked regular file no larger than its schema allows
    (diskfiles.read_file): safetensors' own safe_open maps whatever the path names, a FIFO or
    /dev/zero included."""
    data = read_file(path, SCHEMA_OF_FORMAT[expected_format].max_bytes, stage)
    return decode_safetensors(data, path, stage, expected_format, metadata_only)


def decode_safetensors(
    data: bytes, path: Path, stage: str, expected_format: str, metadata_only: bool = False
) -> tuple[dict, dict[str, Any]]:
    """read_safetensors on bytes already read from `path` (one read: a reader that must see one
    consistent version of a file that writers replace). `metadata_only` still checks the whole
    file, without torch: `status` and an up-to-date `run` need none."""
    try:
        tensors, raw = parse_safetensors(data, metadata_only)
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except Exception as error:  # safetensors raises several unrelated types on damage, plus struct / JSON errors
        raise _not_safetensors(path, stage, error) from None
    return tensors, _checked_kind(metadata, path, stage, expected_format)


def parse_safetensors(data: bytes, metadata_only: bool) -> tuple[dict, dict[str, str]]:
    """The tensors (none when metadata_only, and then without torch) and the raw metadata (str ->
    str) of a safetensors file's bytes; raises on damage."""
    if metadata_only:
        from safetensors import deserialize

        deserialize(data)  # the header and every tensor's extent, as loading would check them
        tensors = {}
    else:
        from safetensors.torch import load

        tensors = load(data)
    (header_size,) = struct.unpack("<Q", data[:8])
    return tensors, json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}


def _not_safetensors(path: Path, stage: str, error: BaseException) -> MnistsumError:
    return MnistsumError(f"{path} is not a valid safetensors file ({first_line(error)}): rerun `mnistsum {stage}`")


def _checked_kind(metadata: dict[str, Any], path: Path, stage: str, expected_format: str) -> dict[str, Any]:
    if metadata.get("format") != expected_format:
        raise MnistsumError(f"{path} is not a {expected_format} file: rerun `mnistsum {stage}`")
    return metadata
