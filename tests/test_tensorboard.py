"""`train --tensorboard`: events read back with tensorboard's own reader, across an interrupt and
`--resume`; a one-line hint without the package; nothing of it loaded without the flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VAL_SIZE, FakeMnist, assert_one_line_error

pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def prepared(fake_mnist: FakeMnist, in_tmp: Path, run_cli) -> Path:
    assert run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE)[0] == 0
    return in_tmp


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_events_match_history_across_a_resume(prepared: Path, run_cli, ctrl_c_after_epoch) -> None:
    ctrl_c_after_epoch()
    code, _, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 3, "--tensorboard")
    assert code == 130, err
    ctrl_c_after_epoch(False)
    code, _, err = run_cli("train", "--resume", "--cpu", "--tensorboard")
    assert code == 0, err

    history = json.loads((prepared / "artifacts" / "history.json").read_text())
    folders = list((prepared / "artifacts" / "tensorboard").iterdir())
    assert [folder.name for folder in folders] == [history["run_id"]], "one log folder per run, continued by --resume"
    found = events(folders[0])
    steps = [row for record in history["epochs"] for row in record["steps"]]
    for key in ("train_loss", "train_sum_accuracy", "lr"):
        logged = found.Scalars(f"step/{key}")
        assert [event.step for event in logged] == [row["step"] for row in steps] == list(range(1, len(steps) + 1)), key
        assert [event.value for event in logged] == pytest.approx([row[key] for row in steps], rel=1e-6), key
    val = found.Scalars("epoch/val_sum_accuracy")
    assert [event.step for event in val] == [record["steps"][-1]["step"] for record in history["epochs"]]
    assert [event.value for event in val] == pytest.approx([record["val_sum_accuracy"] for record in history["epochs"]])

    content = found.PluginTagToContent("hparams")  # add_hparams writes its summary beside the scalars
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["arch"].string_value == history["config"]["arch"]
    assert start.hparams["lr"].number_value == pytest.approx(history["config"]["lr"])
    kept = history["epochs"][history["best_epoch"] - 1]
    assert [event.value for event in found.Scalars("final/val_sum_accuracy")] == pytest.approx(
        [kept["val_sum_accuracy"]]
    )


def test_tensorboard_dir_is_where_the_events_go(prepared: Path, run_cli) -> None:
    code, _, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--tensorboard-dir", "tb")
    assert code == 0, err
    history = json.loads((prepared / "artifacts" / "history.json").read_text())
    logged = events(prepared / "tb" / history["run_id"]).Scalars("step/train_loss")
    assert [event.step for event in logged] == [row["step"] for row in history["epochs"][0]["steps"]]
    assert not (prepared / "artifacts" / "tensorboard").exists()


def test_without_the_package_one_line_says_how_to_install(
    prepared: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec answers None
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--tensorboard")
    assert code == 1
    assert "pip install 'mnistsum[tensorboard]'" in assert_one_line_error(err, out)
    assert not (prepared / "artifacts").exists()


def test_training_without_the_flag_loads_no_tensorboard(prepared: Path) -> None:
    code = (
        "import sys\nfrom mnistsum_cli.cli.app import main\ntry:\n    main(['train', '--preset', 'cpu', '--cpu', '--epochs', '1'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\nprint('LOADED', 'tensorboard' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=prepared, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED False" in result.stdout
