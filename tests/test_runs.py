"""Training runs through the CLI: which settings are used, keeping the previous run when a new
one starts, warnings, and what an interrupt reports."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import VAL_SIZE, FakeMnist, assert_one_line_error, snapshot
from mnistsum_cli.settings import PRESETS, TrainConfig
from mnistsum_cli.store.paths import RunDir
from mnistsum_cli.store.transactions import commit
from mnistsum_cli.training.run import aside_folder, set_aside
from mnistsum_cli.training.session import choose_config, few_steps_warning


def run_id(artifacts: Path) -> str:
    return json.loads((artifacts / "train_state.json").read_text())["run_id"]


def train_state(run_cli) -> str:
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    return {stage["stage"]: stage["state"] for stage in json.loads(out)}["train"]


# --------------------------------------------------------------------------- status and run agree


def test_run_without_flags_keeps_the_settings_of_the_saved_run(workdir: Path, fake_mnist: FakeMnist, run_cli) -> None:
    """The fixture run used `--preset cpu --epochs 1`, not what a bare `train` would choose:
    `status` calls it up to date, and a bare `run` agrees and trains nothing."""
    assert train_state(run_cli) == "up to date"
    model = (workdir / "artifacts" / "model.safetensors").read_bytes()
    code, out, err = run_cli("run", "--cpu", "--mnist-dir", fake_mnist.root)
    assert code == 0, err
    assert "prepare: up to date" in out and "train: up to date" in out, out
    assert (workdir / "artifacts" / "model.safetensors").read_bytes() == model
    assert not (workdir / "artifacts" / "previous").exists()
    assert set(json.loads(run_cli("status", "--json")[1])[i]["state"] for i in range(4)) == {"up to date"}


def test_run_with_other_settings_names_them_and_keeps_the_previous_run(
    workdir: Path, fake_mnist: FakeMnist, run_cli
) -> None:
    artifacts = workdir / "artifacts"
    old_id, before = run_id(artifacts), snapshot(artifacts)
    code, out, err = run_cli("run", "--cpu", "--mnist-dir", fake_mnist.root, "--epochs", 2)
    assert code == 0, err
    changed = err.index("epochs 1 → 2")
    assert changed < err.index("kept the previous run"), "the changed settings are named before training"
    kept = artifacts / "previous" / old_id
    assert str(Path("artifacts", "previous", old_id)) in err
    assert snapshot(kept) == {name: data for name, data in before.items()}, "the previous run is kept whole"
    history = json.loads((artifacts / "history.json").read_text())
    assert history["config"]["epochs"] == 2 and history["config"]["arch"] == PRESETS["cpu"].arch


# --------------------------------------------------------------------------- the previous run is kept


def test_train_keeps_the_previous_run_and_says_where(workdir: Path, run_cli) -> None:
    artifacts = workdir / "artifacts"
    old_id, before = run_id(artifacts), snapshot(artifacts)
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--seed", 5)
    assert code == 0, err
    kept = Path("artifacts", "previous", old_id)
    assert f"kept the previous run ({PRESETS['cpu'].arch}, 1 epoch) in {kept}" in err
    assert snapshot(artifacts / "previous" / old_id) == before
    assert run_id(artifacts) != old_id
    # the kept folder is a complete artifacts folder: the later stages work on it
    code, _, err = run_cli("evaluate", "--cpu", "--artifacts", artifacts / "previous" / old_id)
    assert code == 0, err


def test_train_over_an_incomplete_run_says_it_was_resumable_and_keeps_it(
    workdir: Path, run_cli, ctrl_c_after_epoch
) -> None:
    ctrl_c_after_epoch()
    assert run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 2)[0] == 130
    ctrl_c_after_epoch(False)
    artifacts = workdir / "artifacts"
    incomplete_id = run_id(artifacts)

    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1)
    assert code == 0, err
    kept = Path("artifacts", "previous", incomplete_id)
    assert f"held a resumable run (epoch 1 of 2): kept it in {kept}" in err
    assert f"mnistsum train --resume --artifacts {kept}" in err
    code, out, err = run_cli("train", "--resume", "--cpu", "--artifacts", kept)
    assert code == 0, err
    assert [r["epoch"] for r in json.loads((workdir / kept / "history.json").read_text())["epochs"]] == [1, 2]


def test_set_aside_moves_the_whole_run_in_one_commit(workdir: Path) -> None:
    run = RunDir(workdir / "artifacts")
    before = {name: data for name, data in snapshot(run.root).items() if not name.startswith(".mnistsum-")}
    kept = aside_folder(run)
    assert kept == run.previous / run_id(run.root)
    with commit(run.root) as change:
        set_aside(change, run, kept)
    assert snapshot(kept) == before
    assert aside_folder(run) is None, "nothing left to keep"


def test_set_aside_a_run_whose_json_files_are_unreadable(tmp_path: Path) -> None:
    """Damaged JSON (a list, nesting past the parser's limit) names no run id: the run is kept
    under a time stamp rather than stopping the new run with a traceback."""
    run = RunDir(tmp_path / "artifacts")
    run.root.mkdir()
    run.train_state.write_text("[" * 100_000 + "]" * 100_000)
    run.history.write_text("[1, 2]")
    kept = aside_folder(run)
    assert kept is not None and kept.name.startswith("unknown-")
    with commit(run.root) as change:
        set_aside(change, run, kept)
    assert sorted(path.name for path in kept.iterdir()) == ["history.json", "train_state.json"]


# --------------------------------------------------------------------------- the preset fits the device


@pytest.mark.parametrize("device_type, name", [("cpu", "cpu"), ("cuda", "default")])
def test_no_preset_picks_the_one_for_the_device(device_type: str, name: str) -> None:
    config, notice = choose_config(None, {"epochs": 1}, lambda: device_type)
    assert config == PRESETS[name].with_overrides(epochs=1)
    assert f"`{name}`" in notice
    forced, notice = choose_config("default", {}, lambda: device_type)
    assert forced == PRESETS["default"] and notice is None
    saved = TrainConfig(arch="lenet", epochs=3)
    assert choose_config(None, {"lr": 0.1}, lambda: device_type, saved) == (saved.with_overrides(lr=0.1), None)


def test_train_without_preset_on_the_cpu(workdir: Path, run_cli) -> None:
    code, out, err = run_cli("train", "--cpu", "--epochs", 1)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "no --preset" in line]
    assert len(notes) == 1 and "`cpu`" in notes[0], err
    assert json.loads((workdir / "artifacts" / "config.json").read_text())["config"]["arch"] == PRESETS["cpu"].arch

    code, out, err = run_cli("train", "--cpu", "--preset", "default", "--epochs", 1, "--batch-size", 16)
    assert code == 0, err
    assert "no --preset" not in err
    assert json.loads((workdir / "artifacts" / "config.json").read_text())["config"]["arch"] == PRESETS["default"].arch


# --------------------------------------------------------------------------- too few steps


def test_few_steps_warning() -> None:
    message = few_steps_warning(rows=2000, batch_size=1024, steps=1)
    assert (
        "only 1 optimizer step per epoch" in message and "--batch-size (e.g. 100)" in message and "--limit" in message
    )
    assert few_steps_warning(rows=60_000, batch_size=1024, steps=58) is None


def test_train_warns_about_too_few_steps(workdir: Path, run_cli) -> None:
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1)  # 320 rows in batches of 128
    assert code == 0, err
    assert "only 2 optimizer steps per epoch" in err and "--batch-size" in err
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--batch-size", 16)
    assert code == 0, err
    assert "optimizer step" not in err


# --------------------------------------------------------------------------- interrupts say what is on disk


@pytest.mark.parametrize("epochs, expected", [(2, "epoch 1 of 2 is saved"), (1, "the only epoch is in")])
def test_ctrl_c_during_the_save_reports_the_saved_epoch(
    workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch, epochs: int, expected: str
) -> None:
    """Ctrl-C while epoch 1 is written: the save completes (Ctrl-C is held), the epoch's line
    is never printed, and the message names the epoch that is on disk."""
    import mnistsum_cli.training.checkpoint

    real_bytes = mnistsum_cli.training.checkpoint.safetensors_bytes

    def ctrl_c_while_saving(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real_bytes(*args, **kwargs)

    monkeypatch.setattr(mnistsum_cli.training.checkpoint, "safetensors_bytes", ctrl_c_while_saving)
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", epochs)
    assert code == 130
    line = assert_one_line_error(err, out)
    assert expected in line, line
    assert ("--resume" in line) == (epochs > 1)
    assert json.loads((workdir / "artifacts" / "train_state.json").read_text())["epoch"] == 1
    assert "epoch 1/" not in out


def test_interrupted_run_suggests_run_and_run_resumes(
    workdir: Path, fake_mnist: FakeMnist, run_cli, ctrl_c_after_epoch
) -> None:
    ctrl_c_after_epoch()
    args = ("run", "--cpu", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE)
    code, out, err = run_cli(*args, "--epochs", 2)
    assert code == 130
    line = assert_one_line_error(err, out)
    assert "epoch 1 of 2 is saved" in line and "`mnistsum run`" in line and "train --resume" not in line
    assert train_state(run_cli) == "incomplete"

    ctrl_c_after_epoch(False)
    code, out, err = run_cli(*args)  # no training flags: the saved run's settings, resumed
    assert code == 0, err
    assert "resuming it" in err
    history = json.loads((workdir / "artifacts" / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"]] == [1, 2]
    assert train_state(run_cli) == "up to date"


def test_train_counts_the_epochs_it_trained(workdir: Path, run_cli, ctrl_c_after_epoch) -> None:
    """One epoch is "1 epoch"; after --resume the count is of the epochs this call trained, not
    of all the run's (which the range and "resumed" say)."""
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1)
    assert code == 0, err
    assert "trained 1 epoch on cpu" in out, out
    code, out, err = run_cli("status", "--json")
    assert {stage["stage"]: stage["detail"] for stage in json.loads(out)}["train"].endswith(", 1 epoch"), out
    ctrl_c_after_epoch()
    assert run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 3)[0] == 130
    ctrl_c_after_epoch(False)
    code, out, err = run_cli("train", "--resume", "--cpu")
    assert code == 0, err
    assert "trained 2 epochs (epochs 2-3 of 3, resumed) on cpu" in out, out


def test_ctrl_c_in_the_first_epoch_of_a_first_run(
    fake_mnist: FakeMnist, in_tmp: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnistsum_cli.cli import report

    assert run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE)[0] == 0

    def ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(report.ProgressReporter, "step", ctrl_c)
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 2)
    assert code == 130
    line = assert_one_line_error(err, out)
    assert "no epoch of this run is on disk" in line and "saved in" not in line and "--resume" not in line
    assert not (in_tmp / "artifacts" / "train_state.json").exists()


def test_a_new_run_that_fails_before_saving_leaves_the_previous_run_in_place(
    workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnistsum_cli.training.loop
    from mnistsum_cli.errors import MnistsumError

    def out_of_memory(*args, **kwargs):
        raise MnistsumError("out of memory")

    before = snapshot(workdir / "artifacts")
    monkeypatch.setattr(mnistsum_cli.training.loop, "train_epoch", out_of_memory)
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--seed", 9)
    assert code == 1
    assert "out of memory" in assert_one_line_error(err, out)
    assert snapshot(workdir / "artifacts") == before
