"""The repository's own folders: data/ and artifacts/ are kept with a README, their contents
and the artifacts-* folders of docs/performance.md's commands are ignored."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder, stage", [("data", "mnistsum prepare"), ("artifacts", "mnistsum train")])
def test_output_folders_have_a_readme(folder: str, stage: str) -> None:
    text = (REPO / folder / "README.md").read_text()
    assert stage in text and "ignored by git" in text


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_generated_files_are_ignored_but_the_readmes_are_not() -> None:
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    for path in (
        "data/train.parquet",
        "data/MNIST/raw/t10k-images-idx3-ubyte",
        "artifacts/model.safetensors",
        "artifacts/previous/0123/history.json",
        "artifacts-cpu/model.safetensors",
    ):
        assert ignored(path), path
    for path in ("data/README.md", "artifacts/README.md"):
        assert not ignored(path), path
