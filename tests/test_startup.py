"""The command line before any stage runs: fast start-up without the heavy libraries, refusals
before torch loads, help texts, one meaning per flag, and a quiet exit on a closed pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VAL_SIZE, assert_one_line_error
from mnistsum_cli.cli.preflight import cuda_driver_missing
from mnistsum_cli.settings import PRESETS, describe_preset

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

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

COMMANDS = [
    "prepare",
    "train",
    "evaluate",
    "plot",
    "predict",
    "run",
    "status",
    "serve",
    "runs",
    "compare",
    "export",
    "sweep",
]


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


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_flag_placeholder_or_eaten_markup(run_cli, command: str) -> None:
    """No `<bool>` after flags; no ' .' left where rich took a '[...]' in a help text for markup."""
    code, out, err = run_cli(command, "--help")
    assert code == 0, err
    for text in (out, run_cli("--help")[1]):
        assert "<bool>" not in text
        assert " ." not in flattened(text)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_placeholders_are_words_not_python_types(run_cli, command: str) -> None:
    code, out, err = run_cli(command, "--help")
    assert code == 0, err
    for python_type in ("list[", "<str>", "<int>", "<float>", "{"):
        assert python_type not in out, f"{command} --help shows {python_type}"


def test_arguments_read_as_their_metavars(run_cli) -> None:
    predict, compare = (flattened(run_cli(command, "--help")[1]) for command in ("predict", "compare"))
    assert "Usage: mnistsum predict [OPTIONS] [IMAGE...]" in predict
    assert "IMAGE... PNG, JPEG" in predict
    assert "Usage: mnistsum compare [OPTIONS] RUN..." in compare
    assert "RUN... Run ids" in compare
    sweep = flattened(run_cli("sweep", "--help")[1])
    assert "--study NAME" in sweep and "--storage URL" in sweep and "--gpus IDS" in sweep


@pytest.mark.parametrize(
    "command, says",
    [
        ("evaluate", "Split to measure."),
        ("predict", "Split whose row --index predicts."),
        ("run", "Split the evaluate stage measures."),
        ("status", "Split whose evaluation the table shows."),
    ],
)
def test_split_says_what_each_command_does_with_it(run_cli, command: str, says: str) -> None:
    assert says in flattened(run_cli(command, "--help")[1])


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


def test_out_names_a_file_to_write_and_no_folder(in_tmp: Path, run_cli) -> None:
    """--out, deprecated for --data/--artifacts through 0.1.0, is gone from prepare and train:
    --out is the file `compare` and `export` write, and nothing else."""
    for argv in (["prepare", "--out", "elsewhere"], ["train", "--cpu", "--out", "elsewhere"]):
        code, out, err = run_cli(*argv)
        assert code == 2, argv
        assert "No such option: --out" in assert_one_line_error(err, out)
    assert not list(in_tmp.iterdir())
    for command in ("compare", "export"):
        assert "--out" in flattened(run_cli(command, "--help")[1])


def test_force_redoes_stages_and_allow_mismatch_takes_other_inputs(run_cli) -> None:
    """`run --force` redoes every stage; evaluate and plot take inputs of another run with
    --allow-mismatch, and have no --force."""
    assert "Redo every stage" in flattened(run_cli("run", "--help")[1])
    assert "--allow-mismatch" not in flattened(run_cli("run", "--help")[1])
    for command in ("evaluate", "plot"):
        text = flattened(run_cli(command, "--help")[1])
        assert "--allow-mismatch" in text and "--force" not in text, command


GPU_REFUSALS = [
    ["train", "--gpu", "0"],
    ["evaluate", "--gpu", "0"],
    ["run", "--gpu", "1"],
    ["predict", "seven.png", "--number", "3", "--gpu", "0"],
    ["predict", "--index", "0", "--gpu", "0"],
    ["serve", "--gpu", "0"],
]


def refusal_before_torch(argv: list[str], cwd: Path, allowed: tuple[str, ...] = ()) -> tuple[str, str, float]:
    """Run `mnistsum argv` in a fresh interpreter: its exit code, its one-line error and the
    command's own seconds, with no heavy module but the `allowed` loaded meanwhile."""
    code = (
        "import sys, time\nfrom mnistsum_cli.cli.app import main\nstart = time.perf_counter()\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as exit_:\n    code = exit_.code\n"
        "print('SECONDS:', time.perf_counter() - start)\nprint('CODE:', code)\n"
        f"print('LOADED:', *[name for name in {tuple(set(HEAVY) - set(allowed))!r} if name in sys.modules])"
    )
    result = python(code, cwd=cwd)
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert lines["LOADED"].strip() == "", lines["LOADED"]
    return lines["CODE"].strip(), assert_one_line_error(result.stderr, ""), float(lines["SECONDS"])


@pytest.mark.skipif(not cuda_driver_missing(), reason="a CUDA driver is installed: torch decides about --gpu")
@pytest.mark.parametrize("argv", GPU_REFUSALS, ids=[" ".join(argv) for argv in GPU_REFUSALS])
def test_gpu_without_a_cuda_driver_is_refused_before_torch(tmp_path: Path, argv: list[str]) -> None:
    """On a machine without CUDA, --gpu is refused in one line (exit 2) before torch loads, in
    well under 0.5 s of the command's own time (importing torch to ask takes seconds)."""
    code, error, seconds = refusal_before_torch(argv, tmp_path)
    assert code == "2" and "CUDA is not available" in error
    assert seconds < 0.5, seconds
    assert not list(tmp_path.iterdir())


PREDICT_REFUSALS = [
    (["predict", "nothere.png", "--number", "3"], "1", "nothere.png: no such file"),
    (["predict", "data", "--number", "3"], "1", "data: not a file"),
    (["predict", "--index", "99999", "--split", "val"], "2", f"--index 99999: the val split has rows 0-{VAL_SIZE - 1}"),
]


@pytest.mark.parametrize("argv, exit_code, message", PREDICT_REFUSALS, ids=[" ".join(a) for a, *_ in PREDICT_REFUSALS])
def test_predict_refuses_a_missing_image_or_row_before_torch(
    workdir: Path, argv: list[str], exit_code: str, message: str
) -> None:
    """Issue 23 edge 5: predict read a split and loaded torch (seconds) before it said that the
    image or the row is not there; the check now needs only the file system and Parquet metadata."""
    code, error, seconds = refusal_before_torch([*argv, "--cpu"], workdir, allowed=("pyarrow",))  # row counts
    assert code == exit_code and message in error, error
    assert seconds < 0.5, seconds


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
