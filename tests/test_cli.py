"""The `mnistsum` command line, driven through mnistsum_cli.cli.app.main on the fake MNIST."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from conftest import PNG_MAGIC, VAL_SIZE, FakeMnist, assert_one_line_error, snapshot
from mnistsum_cli import __version__
from mnistsum_cli.data.mnist import MNIST_DIR_ENV
from mnistsum_cli.settings import PRESETS
from mnistsum_cli.store.splits import METADATA_KEY
from mnistsum_cli.training.checkpoint import WEIGHTS_PREFIX

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch


def _commands() -> list[str]:
    import typer

    from mnistsum_cli.cli.app import app

    return list(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


COMMANDS = _commands()
assert {"prepare", "train", "evaluate", "plot"} <= set(COMMANDS), COMMANDS
ARTIFACTS = ["model.safetensors", "checkpoint.safetensors", "history.json", "train_state.json", "config.json"]
REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


# --------------------------------------------------------------------------- help and version


def test_version(run_cli) -> None:
    code, out, err = run_cli("--version")
    assert code == 0, err
    assert out.strip() == f"mnistsum {__version__}"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_root_help(run_cli, flag: str) -> None:
    code, out, err = run_cli(flag)
    assert code == 0, err
    assert "Usage: mnistsum" in out
    for command in COMMANDS:
        assert command in out


def test_root_help_shows_an_example(run_cli) -> None:
    code, out, _ = run_cli("--help")
    assert code == 0
    assert "Example" in out, "the top-level --help shows no example"
    after = out.split("Example", 1)[1]
    assert any(f"mnistsum {command}" in after for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_shows_an_example(run_cli, command: str) -> None:
    code, out, err = run_cli(command, "--help")
    assert code == 0, err
    assert f"Usage: mnistsum {command}" in out
    assert "Example" in out
    assert f"mnistsum {command}" in out.split("Example", 1)[1], "the example does not use the command"


def test_unknown_command(run_cli) -> None:
    code, out, err = run_cli("frobnicate")
    assert code == 2
    assert_one_line_error(err, out)


# --------------------------------------------------------------------------- the success path


def test_prepare_train_evaluate_plot(fake_mnist: FakeMnist, in_tmp: Path, run_cli) -> None:
    code, out, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE)
    assert code == 0, err
    for split in ("train", "val", "test"):
        assert (in_tmp / "data" / f"{split}.parquet").is_file()
    assert "Traceback" not in err

    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1)
    assert code == 0, err
    for name in ARTIFACTS:
        assert (in_tmp / "artifacts" / name).is_file(), name
    assert "model.safetensors" in out
    history = json.loads((in_tmp / "artifacts" / "history.json").read_text())
    assert len(history["epochs"]) == 1
    assert history["config"]["arch"] == PRESETS["cpu"].arch and history["config"]["epochs"] == 1

    code, out, err = run_cli("evaluate", "--cpu")
    assert code == 0, err
    metrics = json.loads((in_tmp / "artifacts" / "evaluation_test.json").read_text())
    assert metrics["split"] == "test" and metrics["rows"] == 120
    for key in ("digit_accuracy", "sum_accuracy", "consistency"):
        assert 0.0 <= metrics[key] <= 1.0
    assert sum(map(sum, metrics["digit_confusion"])) == 120
    assert "evaluation_test.json" in out

    code, out, err = run_cli("evaluate", "--cpu", "--split", "val")
    assert code == 0, err
    assert json.loads((in_tmp / "artifacts" / "evaluation_val.json").read_text())["rows"] == VAL_SIZE

    code, out, err = run_cli("plot")
    assert code == 0, err
    plots = in_tmp / "artifacts" / "plots"
    expected = ["loss.png", "accuracy.png"] + [
        f"confusion_{h}_{s}.png" for h in ("digit", "sum") for s in ("test", "val")
    ]
    for name in expected:
        content = (plots / name).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 1000, name
    assert "loss.png" in out

    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    stages = json.loads(out)
    assert [s["stage"] for s in stages] == ["prepare", "train", "evaluate", "plot"]
    assert all(s["state"] == "up to date" for s in stages), stages


def test_run_twice_skips_every_stage(fake_mnist: FakeMnist, in_tmp: Path, run_cli) -> None:
    args = ("run", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--preset", "cpu", "--cpu", "--epochs", 1)
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert (in_tmp / "artifacts" / "evaluation_test.json").is_file()
    assert (in_tmp / "artifacts" / "plots" / "loss.png").is_file()
    before = snapshot(in_tmp)
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert out.count("up to date") == 4, out
    assert snapshot(in_tmp) == before


def test_evaluate_json_is_parseable(workdir: Path, run_cli) -> None:
    code, out, err = run_cli("evaluate", "--json")  # no --cpu: a notice may go to stderr, never stdout
    assert code == 0, err
    metrics = json.loads(out)
    assert 0.0 <= metrics["digit_accuracy"] <= 1.0
    assert 0.0 <= metrics["sum_accuracy"] <= 1.0
    assert metrics["rows"] == 120
    assert metrics == json.loads((workdir / "artifacts" / "evaluation_test.json").read_text())


def test_evaluate_refuses_model_of_another_dataset(fake_mnist: FakeMnist, workdir: Path, run_cli) -> None:
    code, _, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--seed", 1)
    assert code == 0, err
    code, out, err = run_cli("evaluate", "--cpu")
    assert code == 1
    assert "--allow-mismatch" in assert_one_line_error(err, out)
    code, out, err = run_cli("evaluate", "--cpu", "--force")  # `run --force` redoes stages: not this
    assert code == 2
    assert "--force" in assert_one_line_error(err, out)
    code, out, err = run_cli("evaluate", "--cpu", "--allow-mismatch")
    assert code == 0, err


# --------------------------------------------------------------------------- MNIST location


def test_prepare_with_env_var(fake_mnist: FakeMnist, in_tmp: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MNIST_DIR_ENV, str(fake_mnist.root))
    code, out, err = run_cli("prepare", "--val-size", VAL_SIZE)
    assert code == 0, err
    meta = json.loads(pq.read_schema(in_tmp / "data" / "train.parquet").metadata[METADATA_KEY])
    assert Path(meta["mnist_root"]) == fake_mnist.root.resolve()
    assert not (in_tmp / "data" / "MNIST").exists(), "nothing may be downloaded when the env var is set"


def test_prepare_with_raw_folder_option(fake_mnist: FakeMnist, in_tmp: Path, run_cli) -> None:
    code, out, err = run_cli(
        "prepare", "--mnist-dir", fake_mnist.raw_dir, "--val-size", VAL_SIZE, "--data", "elsewhere"
    )
    assert code == 0, err
    assert (in_tmp / "elsewhere" / "val.parquet").is_file()
    assert not (in_tmp / "data").exists()


def test_mnist_dir_option_beats_env_var(
    fake_mnist: FakeMnist, in_tmp: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MNIST_DIR_ENV, str(in_tmp / "nowhere"))
    code, out, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE)
    assert code == 0, err


def test_prepare_with_missing_mnist_dir(in_tmp: Path, run_cli) -> None:
    code, out, err = run_cli("prepare", "--mnist-dir", in_tmp / "empty", "--val-size", VAL_SIZE)
    assert code == 1
    line = assert_one_line_error(err, out)
    assert "--mnist-dir" in line
    assert not (in_tmp / "data").exists()


def test_prepare_without_mnist_and_without_network(in_tmp: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --mnist-dir, no env var, nothing in ./data, no network: one clear error, fast.

    The network is cut inside this process (DNS and connect fail at once), so torchvision's
    real download code runs without ever waiting on a remote host."""

    def offline(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    code, out, err = run_cli("prepare", "--val-size", VAL_SIZE)
    assert code == 1
    line = assert_one_line_error(err, out)
    assert "--mnist-dir" in line and MNIST_DIR_ENV in line
    assert not list(in_tmp.rglob("*.parquet"))


# --------------------------------------------------------------------------- missing inputs


def test_train_without_prepare(in_tmp: Path, run_cli) -> None:
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1)
    assert code == 1
    assert "mnistsum prepare" in assert_one_line_error(err, out)
    assert not (in_tmp / "artifacts" / "model.safetensors").exists()


def test_evaluate_without_train(workdir: Path, run_cli) -> None:
    shutil.rmtree(workdir / "artifacts")
    code, out, err = run_cli("evaluate", "--cpu")
    assert code == 1
    assert "mnistsum train" in assert_one_line_error(err, out)


def test_evaluate_without_anything(in_tmp: Path, run_cli) -> None:
    code, out, err = run_cli("evaluate", "--cpu")
    assert code == 1
    line = assert_one_line_error(err, out)
    assert "mnistsum train" in line or "mnistsum prepare" in line


def test_plot_without_train(in_tmp: Path, run_cli) -> None:
    code, out, err = run_cli("plot")
    assert code == 1
    assert "mnistsum train" in assert_one_line_error(err, out)
    assert not (in_tmp / "artifacts" / "plots").exists()


def test_resume_with_nothing_to_resume(workdir: Path, run_cli) -> None:
    shutil.rmtree(workdir / "artifacts")
    code, out, err = run_cli("train", "--resume", "--cpu")
    assert code == 1
    assert "mnistsum train" in assert_one_line_error(err, out)


# --------------------------------------------------------------------------- damaged inputs


def test_truncated_split(workdir: Path, run_cli) -> None:
    path = workdir / "data" / "train.parquet"
    path.write_bytes(path.read_bytes()[:200])
    before = snapshot(workdir / "artifacts")
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1)
    assert code == 1
    assert "mnistsum prepare" in assert_one_line_error(err, out)
    assert snapshot(workdir / "artifacts") == before


def test_split_with_non_utf8_column_name(workdir: Path, run_cli) -> None:
    """A single damaged byte in the Parquet footer must still be one line, not a traceback."""
    path = workdir / "data" / "test.parquet"
    path.write_bytes(path.read_bytes().replace(b"number", b"numb\xdfr"))
    code, out, err = run_cli("evaluate", "--cpu")
    assert code == 1
    assert "mnistsum prepare" in assert_one_line_error(err, out)


def test_garbage_model(workdir: Path, run_cli) -> None:
    (workdir / "artifacts" / "model.safetensors").write_bytes(b"\x00" * 100)
    code, out, err = run_cli("evaluate", "--cpu")
    assert code == 1
    assert "mnistsum train" in assert_one_line_error(err, out)
    code, out, err = run_cli("plot")
    assert code == 1
    assert "mnistsum train" in assert_one_line_error(err, out)


def test_garbage_history(workdir: Path, run_cli) -> None:
    (workdir / "artifacts" / "history.json").write_text("{ not json")
    code, out, err = run_cli("plot")
    assert code == 1
    assert "mnistsum train" in assert_one_line_error(err, out)


@pytest.mark.parametrize("name", ["history.json", "train_state.json"])
def test_resume_with_a_json_file_holding_an_array(workdir: Path, run_cli, name: str) -> None:
    path = workdir / "artifacts" / name
    path.write_text(json.dumps([json.loads(path.read_text())]))
    before = snapshot(workdir)
    code, out, err = run_cli("train", "--resume", "--cpu")
    assert code == 1
    line = assert_one_line_error(err, out)
    assert f"{name} holds a list, expected an object" in line and "mnistsum train" in line
    assert snapshot(workdir) == before


def test_resume_with_a_misshapen_checkpoint_tensor(
    fake_mnist: FakeMnist, in_tmp: Path, run_cli, ctrl_c_after_epoch
) -> None:
    """An interrupted run (a complete one has nothing to resume) whose checkpoint is damaged."""
    from safetensors.torch import load_file, save_file

    assert run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE)[0] == 0
    ctrl_c_after_epoch()
    assert run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 2)[0] == 130
    ctrl_c_after_epoch(False)
    path = in_tmp / "artifacts" / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    name = next(name for name in tensors if name.startswith(WEIGHTS_PREFIX) and name.endswith(".weight"))
    tensors[name] = torch.zeros(3)
    save_file(tensors, str(path), metadata=meta)
    code, out, err = run_cli("train", "--resume", "--cpu")
    assert code == 1
    line = assert_one_line_error(err, out)
    assert "checkpoint.safetensors does not fit architecture" in line and "size mismatch" in line


def _rewrite_model_metadata(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    edit(meta)
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_status_on_model_metadata_without_epoch(workdir: Path, run_cli) -> None:
    _rewrite_model_metadata(workdir / "artifacts" / "model.safetensors", lambda meta: meta.pop("epoch"))
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    train = {stage["stage"]: stage for stage in json.loads(out)}["train"]
    assert train["state"] == "invalid" and "epoch is missing" in train["detail"]
    code, out, err = run_cli("evaluate", "--cpu")
    assert code == 1
    assert "model.safetensors: epoch is missing" in assert_one_line_error(err, out)


def _rewrite_splits(data: Path, edit) -> None:
    """Rewrite each split's metadata (and rows) with edit(split, columns, meta), keeping its schema."""
    for split in ("train", "val", "test"):
        table = pq.read_table(data / f"{split}.parquet")
        columns = {name: table.column(name).to_numpy().copy() for name in table.schema.names}
        meta = json.loads(table.schema.metadata[METADATA_KEY])
        edit(split, columns, meta)
        schema = table.schema.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
        pq.write_table(pa.table(columns, schema=schema), data / f"{split}.parquet")


PAST_MNIST = {
    "train": ["train", "--preset", "cpu", "--cpu", "--epochs", "1"],
    "evaluate": ["evaluate", "--cpu"],
    "predict": ["predict", "--index", "0", "--cpu"],
    "plot": ["plot"],
}


@pytest.mark.parametrize("command", PAST_MNIST, ids=list(PAST_MNIST))
def test_recorded_mnist_sizes_raised(workdir: Path, run_cli, command: str) -> None:
    """Metadata claiming larger MNIST sets than the files it was prepared from: refused where
    MNIST is loaded, before any image_index is looked up."""
    _rewrite_splits(workdir / "data", lambda split, columns, meta: meta.update(mnist_sizes={"train": 500, "test": 500}))
    before = snapshot(workdir / "artifacts")
    code, out, err = run_cli(*PAST_MNIST[command])
    assert code == 1
    line = assert_one_line_error(err, out)
    assert "MNIST set sizes" in line and "mnistsum prepare" in line
    assert snapshot(workdir / "artifacts") == before


@pytest.mark.parametrize("command", [*PAST_MNIST, "status"], ids=[*PAST_MNIST, "status"])
def test_image_index_past_mnist_with_raised_sizes(workdir: Path, run_cli, command: str) -> None:
    """Rows pointing past MNIST, with sizes raised to let them pass: every reader, `status`
    included, sees that the rows are not the ones prepare recorded."""

    def past(split, columns, meta):
        meta.update(mnist_sizes={"train": 500, "test": 500})
        columns["image_index"][-1] = 450

    _rewrite_splits(workdir / "data", past)
    if command == "status":
        code, out, err = run_cli("status", "--json")
        assert code == 0, err
        prepare = json.loads(out)[0]
        assert prepare["state"] == "invalid" and "dataset id" in prepare["detail"]
        return
    code, out, err = run_cli(*PAST_MNIST[command])
    assert code == 1
    assert "dataset id" in assert_one_line_error(err, out)


def test_run_on_metadata_with_a_seed_that_is_text(workdir: Path, fake_mnist: FakeMnist, run_cli) -> None:
    """Damaged metadata is an invalid dataset: `run` says so and prepares it again."""
    _rewrite_splits(workdir / "data", lambda split, columns, meta: meta.update(seed="zero"))
    code, out, err = run_cli("status", "--json")
    assert "seed is 'zero'" in json.loads(out)[0]["detail"]
    code, out, err = run_cli("run", "--cpu", "--val-size", VAL_SIZE, "--epochs", 1, "--mnist-dir", fake_mnist.root)
    assert code == 0, err
    assert "Traceback" not in err
    assert "prepare: invalid" in err and "seed is 'zero'" in err
    assert json.loads(pq.read_schema(workdir / "data" / "train.parquet").metadata[METADATA_KEY])["seed"] == 0


# --------------------------------------------------------------------------- output that cannot take everything


def test_status_json_with_a_folder_name_that_is_not_utf8(in_tmp: Path, run_cli) -> None:
    folder = os.fsdecode(b"run-\xff")
    code, out, err = run_cli("status", "--artifacts", folder, "--json")
    assert code == 0, err
    out.encode("utf-8")
    assert any("run-\\xff" in artifact for stage in json.loads(out) for artifact in stage["artifacts"])


def _mnistsum(*args: object, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a child process (for what a real stdout does: its encoding, a full device)."""
    return subprocess.run(
        [sys.executable, "-m", "mnistsum_cli", *map(str, args)],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs},
        timeout=300,
    )


ASCII_ONLY = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""}


def test_ascii_only_stdout(workdir: Path, fake_mnist: FakeMnist) -> None:
    """Under LC_ALL=C Python writes ASCII: the histograms, arrows and rules degrade, nothing fails."""
    for args in (
        ["prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE],
        ["evaluate", "--cpu"],
        ["status"],
    ):
        done = _mnistsum(*args, env=ASCII_ONLY, cwd=workdir)
        assert done.returncode == 0, done.stderr.decode()
        assert b"Traceback" not in done.stderr
        assert done.stdout.isascii()
        assert b"wrote" in done.stdout or args[0] == "status"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["status", "--json"], ["evaluate", "--cpu"]], ids=["status --json", "evaluate"])
def test_stdout_on_a_full_device(workdir: Path, args: list[str]) -> None:
    with open("/dev/full", "wb") as full:
        done = _mnistsum(*args, cwd=workdir, stdout=full, stderr=subprocess.PIPE)
    assert done.returncode == 1
    err = done.stderr.decode()
    assert err.strip() == "error: cannot write to standard output: No space left on device", err


# --------------------------------------------------------------------------- devices


@no_cuda
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_gpu_without_cuda(workdir: Path, run_cli, command: str) -> None:
    before = snapshot(workdir)
    code, out, err = run_cli(command, "--gpu", 0)
    assert code == 2
    assert "CUDA" in assert_one_line_error(err, out)
    assert snapshot(workdir) == before


def test_gpu_and_cpu_together(workdir: Path, run_cli) -> None:
    before = snapshot(workdir)
    code, out, err = run_cli("train", "--gpu", 0, "--cpu")
    assert code == 2
    line = assert_one_line_error(err, out)
    assert "--gpu" in line and "--cpu" in line
    assert snapshot(workdir) == before


# --------------------------------------------------------------------------- bad option values


BAD_VALUES = [
    ["train", "--epochs", "0"],
    ["train", "--epochs", "-3"],
    ["train", "--batch-size", "-1"],
    ["train", "--batch-size", "0"],
    ["train", "--lr", "0"],
    ["train", "--lr", "-0.1"],
    ["train", "--lr", "nan"],
    # with cheap settings, so that if the value is wrongly accepted the test fails fast
    ["train", "--lr", "inf", "--preset", "cpu", "--epochs", "1", "--cpu"],
    ["train", "--weight-decay", "inf", "--preset", "cpu", "--epochs", "1", "--cpu"],
    ["train", "--weight-decay", "nan"],
    ["train", "--label-smoothing", "nan"],
    ["train", "--lr", "fast"],
    ["train", "--weight-decay", "-1"],
    ["train", "--label-smoothing", "0.9"],
    ["train", "--max-shift", "20"],
    ["train", "--max-rotation", "200"],
    ["train", "--max-rotation", "nan"],
    ["train", "--max-zoom", "-0.1"],
    ["train", "--max-zoom", "inf"],
    ["train", "--arch", "resnet-9000"],
    ["train", "--preset", "turbo"],
    ["train", "--gpu", "-1"],
    ["train", "--resume", "--preset", "cpu"],
    ["train", "--bogus-option"],
    ["prepare", "--val-size", "0"],
    ["prepare", "--limit", "0"],
    ["prepare", "--limit", "-5"],
    ["prepare", "--seed", "zero"],
    ["prepare", "--seed", "-1"],
    ["prepare", "--seed", "4294967296"],
    ["train", "--seed", "99999999999999999999999"],
    ["train", "--seed", "-1"],
    ["run", "--seed", "-1"],
    ["evaluate", "--split", "validation"],
    ["evaluate", "--split", "nope", "--json"],
    ["status", "--split", "nope"],
    ["run", "--split", "nope"],
    ["run", "--epochs", "0"],
]


@pytest.mark.parametrize("args", BAD_VALUES, ids=[" ".join(a) for a in BAD_VALUES])
def test_bad_option_values(workdir: Path, fake_mnist: FakeMnist, run_cli, args: list[str]) -> None:
    before = snapshot(workdir)
    if args[0] in ("prepare", "run"):
        args = [*args, "--mnist-dir", str(fake_mnist.root)]
    code, out, err = run_cli(*args)
    assert code == 2, f"exit {code}; stderr: {err}"
    line = assert_one_line_error(err, out)
    assert "--help" in line or "--" in line
    assert snapshot(workdir) == before, "a refused command changed existing files"


def test_one_training_row_names_the_prepare_options(fake_mnist: FakeMnist, in_tmp: Path, run_cli) -> None:
    """--limit 1 leaves one training row, too few for BatchNorm whatever the batch size: the
    advice names the prepare options that fix it, not --batch-size."""
    code, _, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--limit", 1)
    assert code == 0, err
    code, out, err = run_cli("train", "--arch", "convnet", "--cpu", "--epochs", 1)
    assert code == 2
    line = assert_one_line_error(err, out)
    assert "1 row" in line and "--val-size" in line and "--limit" in line and "--batch-size" not in line


def test_resume_refuses_changed_settings(workdir: Path, run_cli) -> None:
    before = snapshot(workdir)
    code, out, err = run_cli("train", "--resume", "--cpu", "--lr", "0.5")
    assert code == 1
    assert "lr" in assert_one_line_error(err, out)
    assert snapshot(workdir) == before


def test_resume_of_a_finished_run_changes_no_weights(workdir: Path, run_cli) -> None:
    model = (workdir / "artifacts" / "model.safetensors").read_bytes()
    code, out, err = run_cli("train", "--resume", "--cpu")
    assert code == 0, err
    assert (workdir / "artifacts" / "model.safetensors").read_bytes() == model


def test_val_size_too_large_keeps_existing_data(workdir: Path, fake_mnist: FakeMnist, run_cli) -> None:
    before = snapshot(workdir)
    code, out, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", 400)
    assert code == 2
    assert "--val-size" in assert_one_line_error(err, out)
    assert snapshot(workdir) == before


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_in_training_keeps_the_epoch_and_resumes(
    fake_mnist: FakeMnist, in_tmp: Path, run_cli, ctrl_c_after_epoch
) -> None:
    code, _, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE)
    assert code == 0, err
    ctrl_c_after_epoch()
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 2)
    assert code == 130
    line = assert_one_line_error(err, out)
    assert "epoch 1 of 2 is saved" in line and "`mnistsum train --resume`" in line
    assert json.loads((in_tmp / "artifacts" / "train_state.json").read_text())["epoch"] == 1
    assert (in_tmp / "artifacts" / "model.safetensors").is_file()

    ctrl_c_after_epoch(False)
    code, out, err = run_cli("train", "--resume", "--cpu")
    assert code == 0, err
    history = json.loads((in_tmp / "artifacts" / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"]] == [1, 2]


def test_ctrl_c_in_the_first_epoch_leaves_the_previous_run_in_place(
    workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new run stopped before its first epoch is saved has nothing on disk: the previous run
    goes back where it was, unchanged, and the message says so (no `--resume`)."""
    from mnistsum_cli.cli import report

    artifacts = workdir / "artifacts"
    before = snapshot(artifacts)

    def ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(report.ProgressReporter, "step", ctrl_c)
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--seed", 3)
    assert code == 130
    line = assert_one_line_error(err, out)
    assert (
        "before the first epoch was saved: the previous run is still in artifacts, unchanged" in line
        and "--resume" not in line
    )
    assert snapshot(artifacts) == before
    assert not (artifacts / "previous").exists()


def test_ctrl_c_in_prepare(fake_mnist: FakeMnist, in_tmp: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import mnistsum_cli.data.prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mnistsum_cli.data.prepare, "split_bytes", interrupted)
    code, out, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE)
    assert code == 130
    assert "Traceback" not in err and "Traceback" not in out
    assert not list(in_tmp.rglob("*.parquet"))


def test_resume_with_nothing_saved_says_so(in_tmp: Path, run_cli) -> None:
    code, out, err = run_cli("train", "--resume", "--cpu")
    assert code == 1
    assert "nothing to resume in artifacts" in assert_one_line_error(err, out)


@pytest.mark.parametrize(
    "args",
    [
        ("train", "--cpu"),
        ("run", "--cpu", "--mnist-dir", "no-such-mnist"),
        ("evaluate", "--cpu"),
        ("plot",),
    ],
    ids=["train before prepare", "run without data", "evaluate before train", "plot before evaluate"],
)
def test_a_refused_command_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli, args) -> None:
    """Refused for want of its inputs, a command creates no folder, lock or file (issue 23 edge 4)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(*args)
    assert code != 0
    assert_one_line_error(err, out)
    assert list(tmp_path.rglob("*")) == []
