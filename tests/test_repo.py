"""The repository's own folders: data/ and artifacts/ are kept with a README, their contents
and the artifacts-* folders of docs/performance.md's commands are ignored; README's set-up
says what a newcomer needs before the first command, and what --install-completion edits."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

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


def fenced_blocks(text: str) -> list[tuple[int, list[str]]]:
    """README's ```bash blocks: (where each starts, its command lines without comments)."""
    blocks = []
    for match in re.finditer(r"```bash\n(.*?)```", text, re.S):
        lines = [line.split("  #")[0].strip() for line in match.group(1).splitlines()]
        blocks.append((match.start(), [line for line in lines if line]))
    return blocks


def test_readme_asks_cpu_or_gpu_before_the_first_install_and_its_two_commands_are_what_ci_runs() -> None:
    text = (REPO / "README.md").read_text()
    blocks = fenced_blocks(text)
    first_install = next(start for start, lines in blocks if any(line.startswith("pip install") for line in lines))
    choice = text.index("CPU-only machine")
    assert choice < first_install, "a CPU-only user must read the choice before the first pip install"
    assert blocks[0][1] == ["pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"]
    setup, tests = blocks[1][1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert setup == 'pip install -e ".[dev]"' and setup in ci
    assert tests in ci, f"README's test command {tests!r} is not the line .ci/run runs"


def test_readme_says_which_files_install_completion_writes(tmp_path: Path) -> None:
    """Typer's --install-completion edits the user's shell start-up file: README says which."""
    env = {**os.environ, "HOME": str(tmp_path), "SHELL": "/bin/bash"}
    done = subprocess.run(
        [sys.executable, "-m", "mnistsum_cli", "--install-completion"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    assert written == [".bash_completions/mnistsum.sh", ".bashrc"]
    assert "source" in (tmp_path / ".bashrc").read_text()
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "writes `~/.bash_completions/mnistsum.sh` and appends a `source` line for it to `~/.bashrc`" in readme
