"""The package's layering (pyproject's [tool.importlinter] contract) holds: no module imports a
layer above its own, at the top or inside a function."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

REPO = Path(__file__).resolve().parents[1]


def test_each_layer_imports_only_the_layers_below_it() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint_imports), "--no-cache", str(REPO / "pyproject.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout
