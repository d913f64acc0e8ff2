"""The command line before any stage runs: fast start-up without the heavy libraries, help
texts, deprecated folder options, and a quiet exit on a closed pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VAL_SIZE, FakeMnist, assert_one_line_error
from mnistsum_cli.settings import PRESETS, describe_preset

REPO = Path(__file__).resolve().parents[1]
HEAVY = (
    "torch",
    "torchvision",
    "matplotlib",
    "pyarrow",
    "starlette",
    "uvicorn",
    "PIL",
    "tensorboard",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "optuna",
    "sqlalchemy",
)


def python(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.parametrize(
    "argv",
    [
        None,
        ["--help"],
        ["train", "--help"],
        ["run", "--help"],
        ["serve", "--help"],
        ["export", "--help"],
        ["predict", "--runtime", "nope"],
        ["train", "--bogus"],
        ["train", "--arch", "nope"],
        ["--version"],
        ["runs", "--artifacts", "."],
        ["compare", "--help"],
        ["evaluate", "--data", "nowhere", "--artifacts", "nowhere"],
        ["train", "--data", "nowhere"],
        ["plot", "--artifacts", "nowhere"],
        ["predict", "--index", "0", "--artifacts", "nowhere"],
        ["serve", "--artifacts", "."],
        ["sweep", "--help"],
    ],
    ids=[
        "import",
        "--help",
        "train --help",
        "run --help",
        "serve --help",
        "export --help",
        "bad runtime",
        "bad flag",
        "bad arch",
        "--version",
        "runs",
        "compare --help",
        "evaluate without inputs",
        "train without data",
        "plot without inputs",
        "predict without a model",
        "serve without a model",
        "sweep --help",
    ],
)
def test_the_cli_starts_without_heavy_libraries(argv) -> None:
    call = "" if argv is None else f"\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    result = python(
        "import sys\nfrom mnistsum_cli.cli.app import main"
        + call
        + f"\nprint('LOADED:', *[name for name in {HEAVY!r} if name in sys.modules])"
    )
    assert result.returncode == 0, result.stderr
    loaded = [line for line in result.stdout.splitlines() if line.startswith("LOADED:")]
    assert loaded == ["LOADED:"], f"{argv}: {loaded}"


def flattened(text: str) -> str:
    """Help text without rich's box drawing and line wrapping."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize(
    "command",
    ["prepare", "train", "evaluate", "plot", "predict", "run", "status", "serve", "runs", "compare", "export", "sweep"],
)
def test_help_has_no_flag_placeholder_or_eaten_markup(run_cli, command: str) -> None:
    """No `<bool>` after flags; no ' .' left where rich took a '[...]' in a help text for markup."""
    code, out, err = run_cli(command, "--help")
    assert code == 0, err
    for text in (out, run_cli("--help")[1]):
        assert "<bool>" not in text
        assert " ." not in flattened(text)


def test_training_help(run_cli) -> None:
    code, out, err = run_cli("train", "--help")
    assert code == 0, err
    text = flattened(out)
    assert "convnet ." not in text
    for name in PRESETS:
        assert f"{name}: {describe_preset(name)}" in text, name
    assert "--epochs <int range> [1<=x<=10000] Passes over the training split." in text
    assert "--weight-decay <float range> [0<=x<=1.0] AdamW weight decay" in text


def test_predict_help_says_number_replaces_the_rows(run_cli) -> None:
    assert "replaces the row's number" in flattened(run_cli("predict", "--help")[1])


def test_folder_options_are_data_and_artifacts_everywhere(run_cli) -> None:
    for command in ("prepare", "train", "evaluate", "plot", "predict", "run", "status"):
        text = flattened(run_cli(command, "--help")[1])
        assert "--data" in text, command
        assert "--out" not in text, command
        if command != "prepare":
            assert "--artifacts" in text, command


def test_deprecated_out_still_works_with_a_note(fake_mnist: FakeMnist, in_tmp: Path, run_cli) -> None:
    code, out, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--out", "splits")
    assert code == 0, err
    assert "--out is deprecated" in err and "--data splits" in err
    assert (in_tmp / "splits" / "train.parquet").is_file()
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--data", "splits", "--out", "runs")
    assert code == 0, err
    assert "--out is deprecated" in err and "--artifacts runs" in err
    assert (in_tmp / "runs" / "model.safetensors").is_file()
    code, out, err = run_cli("train", "--cpu", "--artifacts", "a", "--out", "b")
    assert code == 2
    assert "--out" in assert_one_line_error(err, out)


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "table"])
def test_broken_pipe_exits_quietly(workdir: Path, as_json: bool) -> None:
    """`mnistsum evaluate [--json] | head -c 0`: the reader is gone before anything is written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mnistsum_cli", "evaluate", "--cpu", *(["--json"] if as_json else [])],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141
    assert stderr == ""
    assert json.loads((workdir / "artifacts" / "evaluation_test.json").read_text())["rows"] > 0
