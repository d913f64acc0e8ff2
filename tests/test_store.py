"""Atomic writes and JSON reads: a failed write leaves the previous file and no temporary file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store import read_json, write_atomic, write_json


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path: Path, error: BaseException) -> None:
    path = tmp_path / "thing.json"
    write_json(path, {"version": 1})
    before = path.read_bytes()

    def half_write(tmp: Path) -> None:
        tmp.write_text('{"version": 2, "trunc')
        raise error

    with pytest.raises(type(error)):
        write_atomic(path, half_write)
    assert path.read_bytes() == before
    assert json.loads(path.read_text()) == {"version": 1}
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing.json"]


def test_failed_first_write_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "new.bin"

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("no space left")

    with pytest.raises(OSError):
        write_atomic(path, fail)
    assert not path.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_successful_write_replaces_file(tmp_path: Path) -> None:
    path = tmp_path / "thing.bin"
    path.write_bytes(b"old")
    write_atomic(path, lambda tmp: tmp.write_bytes(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert _leftovers(tmp_path) == []


def test_read_json_errors_name_the_stage(tmp_path: Path) -> None:
    with pytest.raises(MnistsumError, match="mnistsum train"):
        read_json(tmp_path / "history.json", stage="train")
    (tmp_path / "bad.json").write_bytes(b"{\"a\": \xff")
    with pytest.raises(MnistsumError, match="mnistsum evaluate"):
        read_json(tmp_path / "bad.json", stage="evaluate")


def test_written_files_get_the_usual_mode(tmp_path: Path) -> None:
    """Temporary files are 0600; the renamed artifact must follow the umask like any file."""
    import os

    import torch

    from mnistsum_cli.store import write_json

    from mnistsum_cli.tensorfiles import write_safetensors

    umask = os.umask(0)
    os.umask(umask)
    write_json(tmp_path / "a.json", {"x": 1})
    write_safetensors(tmp_path / "b.safetensors", {"w": torch.zeros(2)}, {"format": "x"})
    for name in ("a.json", "b.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
