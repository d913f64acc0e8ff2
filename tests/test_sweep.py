"""`mnistsum sweep`: a study reaches its number of finished trials, a rerun continues it, hopeless
trials are pruned, a killed worker's trial is retried, bad spaces and storages are one line
before anything is written, and two processes share one PostgreSQL study."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
from listing_checks import assert_readable

from conftest import VAL_SIZE, FakeMnist, _main, assert_one_line_error, mnistsum_process
from mnistsum_cli.data.splitdata import read_dataset_header
from mnistsum_cli.store.paths import DataDir
from mnistsum_cli.sweep.storage import retried_number
from pgserver import postgres_binaries, postgres_server

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

optuna = pytest.importorskip("optuna")

REPO = Path(__file__).resolve().parents[1]
# Two quick epochs of the lean net on the synthetic data: one trial takes about a second.
SPACE = """
epochs = 2
batch_size = 16
[lr]
low = 0.003
high = 0.03
log = true
"""


@pytest.fixture(scope="module")
def prepared(fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder from the synthetic MNIST, and a space file beside it (read-only)."""
    root = tmp_path_factory.mktemp("sweep")
    assert _main("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--data", root / "data") == 0
    (root / "space.toml").write_text(SPACE)
    return root


def sweep_args(prepared: Path, artifacts: Path, *args: object) -> list[object]:
    return [
        "sweep",
        "--cpu",
        "--data",
        prepared / "data",
        "--artifacts",
        artifacts,
        "--space",
        prepared / "space.toml",
        *args,
    ]


def study_of(artifacts: Path, name: str = "sweep") -> optuna.Study:
    storage = f"sqlite:///{artifacts / 'sweeps' / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=storage)


def states(study: optuna.Study) -> list[str]:
    return [trial.state.name for trial in study.get_trials()]


def test_a_sweep_reaches_its_trials_and_a_rerun_continues(
    run_cli, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifacts = tmp_path / "artifacts"
    code, out, err = run_cli(*sweep_args(prepared, artifacts, "--trials", 2, "--seed", 0))
    assert code == 0, err
    assert states(study_of(artifacts)) == ["COMPLETE", "COMPLETE"]
    assert out.count("complete") >= 2 and "best: trial" in out
    assert "train it again: mnistsum train --preset cpu --batch-size 16 --lr " in out
    folders = sorted(p.name for p in (artifacts / "sweeps" / "sweep").glob("trial-*"))
    assert folders == ["trial-0", "trial-1"]
    record = json.loads((artifacts / "sweeps" / "sweep" / "trial-1" / "trial.json").read_text())
    assert record["study"] == "sweep" and record["number"] == 1 and record["state"] == "complete"
    assert record["value"] == study_of(artifacts).trials[1].value
    plots = artifacts / "sweeps" / "sweep" / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["history.png", "importance.png", "parallel.png"]

    # the same command, asking for more, continues: trials 0 and 1 stay, trial 2 is new (and
    # not trial 0 again: the sampler's seed counts the trials there)
    code, out, err = run_cli(*sweep_args(prepared, artifacts, "--trials", 3, "--seed", 0))
    assert code == 0, err
    assert states(study_of(artifacts)) == ["COMPLETE"] * 3
    assert out.count("complete ") == 1  # one trial line: trial 2's
    trials = study_of(artifacts).trials
    assert trials[2].params != trials[0].params

    # reached already: nothing runs
    code, out, err = run_cli(*sweep_args(prepared, artifacts, "--trials", 3))
    assert code == 0 and "trial 3" not in out and len(study_of(artifacts).trials) == 3

    code, out, err = run_cli("sweep", "--show", "--json", "--artifacts", artifacts)
    assert code == 0, err
    rows = json.loads(out)
    assert [row["number"] for row in rows] == [0, 1, 2] and {row["state"] for row in rows} == {"complete"}
    assert all(row["epochs_done"] == 2 and row["lr"] > 0 for row in rows)

    # every trial is a run `runs` lists, with its study, number, state and value
    code, out, err = run_cli("runs", "--json", "--artifacts", artifacts)
    assert code == 0, err
    listed = {row["trial"]: row for row in json.loads(out)}
    assert sorted(listed) == [0, 1, 2]
    assert listed[1]["study"] == "sweep" and listed[1]["trial_state"] == "complete"
    assert listed[1]["trial_value"] == record["value"] == listed[1]["val_sum_accuracy"]

    # the tables, in an 80-column terminal and piped: no header word split, each trial whole
    monkeypatch.chdir(tmp_path)  # short titles
    monkeypatch.setenv("COLUMNS", "80")
    url = "sqlite:///artifacts/sweeps/sweep/study.db"
    for terminal in ("1", "0"):
        monkeypatch.setenv("TTY_COMPATIBLE", terminal)
        code, out, err = run_cli("sweep", "--show", "--storage", url)
        assert code == 0 and err == "", err
        headers = ["trial", "state", "val sum", "train s", "epochs", "lr"]
        width = 80 if terminal == "1" else None
        lines = assert_readable(out, f"study sweep in {url} (accuracy in %)", headers, ["0", "1", "2"], width)
        assert [line.split()[:2] for line in lines if line.split()[:1] in (["0"], ["1"], ["2"])] == [
            [str(number), "complete"] for number in range(3)
        ]
        assert lines[-1].startswith("best: trial ")
        code, out, err = run_cli("runs", "--artifacts", "artifacts")
        assert code == 0 and err == "", err
        ids = [row["run_id"][:8] for row in listed.values()]
        headers = ["run id", "started", "state", "lr", "train s", "val digit", "val sum", "sweep trial"]
        lines = assert_readable(out, "runs in artifacts (accuracy in %)", headers, ids, width)
        if terminal == "0":  # piped: a run's line holds its trial
            trial_1 = next(line for line in lines if line.startswith(listed[1]["run_id"][:8]))
            assert trial_1.endswith(f"sweep #1 complete {100 * record['value']:.2f}")


def test_show_of_a_study_without_trials_says_so(run_cli, tmp_path: Path) -> None:
    """A sweep stopped before its first trial leaves an empty study: one line, not an empty table."""
    folder = tmp_path / "artifacts" / "sweeps" / "empty"
    folder.mkdir(parents=True)
    optuna.create_study(study_name="empty", storage=f"sqlite:///{folder / 'study.db'}")
    code, out, err = run_cli("sweep", "--show", "--study", "empty", "--artifacts", tmp_path / "artifacts")
    assert (code, err) == (0, "") and out == f"study empty in sqlite:///{folder / 'study.db'}: no trials yet\n"


def test_a_hopeless_trial_is_pruned_at_an_epoch_end(run_cli, prepared: Path, tmp_path: Path) -> None:
    """Five trials that learn, then one whose learning rate cannot learn: the median pruner (five
    startup trials) stops it after its first epoch; its folder keeps that epoch."""
    artifacts = tmp_path / "artifacts"
    space = tmp_path / "space.toml"
    space.write_text("epochs = 3\nbatch_size = 16\n[lr]\nchoices = [0.02, 1e-9]\n")
    args = ["sweep", "--cpu", "--data", prepared / "data", "--artifacts", artifacts, "--space", space]
    assert run_cli(*args, "--timeout", 0)[0] == 0  # makes the study, starts no trial
    study = study_of(artifacts)
    for lr in [0.02] * 5 + [1e-9]:
        study.enqueue_trial({"lr": lr})
    code, out, err = run_cli(*args, "--trials", 6)
    assert code == 0, err
    assert states(study_of(artifacts)) == ["COMPLETE"] * 5 + ["PRUNED"]
    pruned = artifacts / "sweeps" / "sweep" / "trial-5"
    history = json.loads((pruned / "history.json").read_text())
    assert len(history["epochs"]) == 1 and (pruned / "model.safetensors").exists()
    assert json.loads((pruned / "trial.json").read_text())["state"] == "pruned"
    assert "trial 5  pruned" in out


def test_ctrl_c_keeps_finished_epochs_marks_the_trial_failed_and_a_rerun_continues(
    run_cli, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnistsum_cli.sweep.pruning import PruningReporter

    original = PruningReporter.epoch_end

    def end_then_ctrl_c(self, record):
        original(self, record)
        raise KeyboardInterrupt

    artifacts = tmp_path / "artifacts"
    monkeypatch.setattr(PruningReporter, "epoch_end", end_then_ctrl_c)
    code, out, err = run_cli(*sweep_args(prepared, artifacts, "--trials", 2))
    line = assert_one_line_error(err)
    assert code == 130 and "interrupted: the study holds 0 of 2 finished trials" in line and "rerun" in line
    assert states(study_of(artifacts)) == ["FAIL"]
    folder = artifacts / "sweeps" / "sweep" / "trial-0"
    assert len(json.loads((folder / "history.json").read_text())["epochs"]) == 1
    assert json.loads((folder / "trial.json").read_text())["state"] == "failed"

    monkeypatch.setattr(PruningReporter, "epoch_end", original)
    code, out, err = run_cli(*sweep_args(prepared, artifacts, "--trials", 2))
    assert code == 0, err
    assert states(study_of(artifacts)) == ["FAIL", "COMPLETE", "COMPLETE"]


def test_a_worker_whose_trial_another_failed_goes_on(
    run_cli, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a busy machine a worker's heartbeats may not reach the storage for the grace period;
    another worker then fails its trial (and retries it). The first worker's next report is
    refused: it says so in one line and goes on, and the study still reaches its number."""
    from optuna.trial import TrialState

    from mnistsum_cli.sweep.pruning import PruningReporter

    original = PruningReporter.epoch_end

    def failed_elsewhere(self, record):
        if self.trial.number == 0 and record["epoch"] == 1:
            self.trial.storage.set_trial_state_values(self.trial._trial_id, TrialState.FAIL)
        original(self, record)

    monkeypatch.setattr(PruningReporter, "epoch_end", failed_elsewhere)
    artifacts = tmp_path / "artifacts"
    code, out, err = run_cli(*sweep_args(prepared, artifacts, "--trials", 1))
    assert code == 0, err
    assert "trial 0 was failed by another worker: its heartbeats stopped; it is retried" in err
    assert "Traceback" not in err
    assert states(study_of(artifacts)) == ["FAIL", "COMPLETE"]


def test_a_killed_workers_trial_is_retried(prepared: Path, tmp_path: Path) -> None:
    """SIGKILL mid-trial leaves it RUNNING; the next sweep's heartbeat check fails it after the
    grace period and runs it again, and the study still reaches its number."""
    artifacts = tmp_path / "artifacts"
    space = tmp_path / "space.toml"
    space.write_text("epochs = 4\nbatch_size = 16\n[lr]\nchoices = [0.01]\n")
    args = ["sweep", "--cpu", "--data", prepared / "data", "--artifacts", artifacts, "--space", space, "--heartbeat", 1]
    worker = mnistsum_process(*args, "--trials", 1)
    first_epoch = artifacts / "sweeps" / "sweep" / "trial-0" / "train_state.json"
    deadline = time.monotonic() + 120
    while not first_epoch.exists() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    assert first_epoch.exists(), "the worker never saved an epoch"
    assert states(study_of(artifacts)) == ["RUNNING"]

    rerun = mnistsum_process(*args, "--trials", 1)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    trials = study_of(artifacts).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert retried_number(trials[1]) == 0 and trials[1].params == trials[0].params
    assert "trial 1  complete" in out


def test_a_worker_with_other_data_is_refused(run_cli, prepared: Path, fake_mnist: FakeMnist, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    assert run_cli(*sweep_args(prepared, artifacts, "--timeout", 0))[0] == 0
    other = tmp_path / "other"
    assert (
        run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--seed", 1, "--data", other)[0] == 0
    )
    before = (artifacts / "sweeps" / "sweep" / "study.db").read_bytes()
    args = sweep_args(prepared, artifacts, "--trials", 1)
    args[args.index(prepared / "data")] = other
    code, out, err = run_cli(*args)
    line = assert_one_line_error(err)
    mine = read_dataset_header(DataDir(prepared / "data")).dataset_id
    theirs = read_dataset_header(DataDir(other)).dataset_id
    assert code == 1 and mine in line and theirs in line
    assert (artifacts / "sweeps" / "sweep" / "study.db").read_bytes() == before
    assert not list((artifacts / "sweeps" / "sweep").glob("trial-*"))


@pytest.mark.parametrize(
    "space, problem",
    [
        ("[learning_rate]\nlow = 0.1\nhigh = 0.2\n", "'learning_rate' is not a training setting"),
        ("[lr]\nlow = 0.0\nhigh = 0.1\n", "lr: low: 0.0 must be greater than 0"),
        ("[warmup]\nlow = 0.1\nhigh = 1.5\n", "warmup: high: 1.5 is above 1"),
        ("[batch_size]\nchoices = [64, 1]\n", "batch_size: 1 is below 2"),
        ("[batch_size]\nlow = 8.5\nhigh = 64\n", "batch_size: low: 8.5 is not an integer"),
        ("[arch]\nchoices = ['lean', 'resnet']\n", "arch: 'resnet' is not one of"),
        ("[lr]\nlow = 0.1\nhigh = 0.01\n", "lr: low 0.1 must be below high 0.01"),
        ("[weight_decay]\nlow = 0.0\nhigh = 0.1\nlog = true\n", "a log scale needs low above 0"),
        ("[lr]\nlow = 0.01\n", "lr: give low and high"),
        ("[lr]\nlow = 0.01\nhigh = 0.1\nlog = true\nstep = 0.01\n", "step must be above 0, and excludes log"),
        ("[lr]\nlo = 0.01\n", "unknown key 'lo'"),
        ("epochs = 0\n[lr]\nchoices = [0.01]\n", "epochs: 0 is below 1"),
        ("epochs = 3\n", "no setting to search"),
        ("[lr\n", "not TOML"),
    ],
)
def test_a_bad_space_is_one_line_before_anything_runs(run_cli, prepared: Path, tmp_path: Path, space, problem) -> None:
    (tmp_path / "bad.toml").write_text(space)
    artifacts = tmp_path / "artifacts"
    args = sweep_args(prepared, artifacts, "--trials", 1)
    args[args.index(prepared / "space.toml")] = tmp_path / "bad.toml"
    code, out, err = run_cli(*args)
    assert problem in assert_one_line_error(err) and code == 2
    assert not artifacts.exists()


def test_storage_problems_are_one_line(
    run_cli, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifacts = tmp_path / "artifacts"
    for storage, problem in [
        ("nosuchdb://here", "storage nosuchdb://here: Can't load plugin"),
        (
            "postgresql+psycopg://mnistsum:secret@127.0.0.1:1/none",
            "storage postgresql+psycopg://mnistsum:***@127.0.0.1:1/none",
        ),
    ]:
        code, out, err = run_cli(*sweep_args(prepared, artifacts, "--trials", 1, "--storage", storage))
        assert problem in assert_one_line_error(err) and code in (1, 2) and "secret" not in err
    assert not artifacts.exists()

    # a study of one objective is refused to a sweep of two, and the other way round; nothing changes
    assert run_cli(*sweep_args(prepared, artifacts, "--timeout", 0))[0] == 0
    database = artifacts / "sweeps" / "sweep" / "study.db"
    before = database.read_bytes()
    code, out, err = run_cli(*sweep_args(prepared, artifacts, "--trials", 1, "--objective", "accuracy,time"))
    assert "--objective accuracy,time needs maximize, minimize" in assert_one_line_error(err) and code == 1
    assert database.read_bytes() == before

    # a SQLite file another process holds locked (waited for a second here, not a minute)
    import sqlite3

    monkeypatch.setattr("mnistsum_cli.sweep.storage.SQLITE_LOCK_WAIT", 1.0)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        code, out, err = run_cli(*sweep_args(prepared, artifacts, "--trials", 1))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "database is locked" in assert_one_line_error(err) and code == 1
    assert database.read_bytes() == before

    code, out, err = run_cli("sweep", "--show", "--study", "other", "--artifacts", artifacts)
    assert "no study 'other'" in assert_one_line_error(err) and code == 1


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres() -> Iterator[str]:
    """The storage URL of a PostgreSQL server of our own (tests/pgserver.py). Skipped where none
    is installed, but under CI=true, where a missing server fails."""
    binaries = postgres_binaries()
    if binaries is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed (apt-get install postgresql): CI must run the PostgreSQL test")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with postgres_server(binaries) as url:
        yield url


def test_two_processes_share_one_postgresql_study(postgres: str, prepared: Path, tmp_path: Path) -> None:
    """Two sweeps at once (as if on two machines: each its own artifacts folder) against one
    server: the study ends with 4 finished trials (plus at most one started by both at once), no
    number twice, and trials of both processes."""
    args = ["sweep", "--cpu", "--data", prepared / "data", "--space", prepared / "space.toml", "--storage", postgres]
    workers = [mnistsum_process(*args, "--artifacts", tmp_path / f"machine-{n}", "--trials", 4) for n in (1, 2)]
    results = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_out, err) in zip(workers, results):
        assert worker.returncode == 0, err
    study = optuna.load_study(study_name="sweep", storage=postgres)
    trials = study.get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 4 <= len(finished) <= 5
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers)
    assert len({t.user_attrs["worker"] for t in finished}) == 2
    for trial in finished:
        folder = Path(trial.user_attrs["folder"])
        assert json.loads((folder / "trial.json").read_text())["number"] == trial.number
    assert socket.gethostname() in finished[0].user_attrs["worker"]


def test_a_study_another_process_is_still_recording_is_waited_for(run_cli, prepared: Path, tmp_path: Path) -> None:
    """Two processes start one study: the second finds it made but its attributes (dataset id,
    objective, space) not yet recorded -- the first sets them one by one -- and waits for them
    rather than calling the study foreign (seen on PostgreSQL in CI)."""
    import threading

    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli(*sweep_args(prepared, first, "--trials", 1, "--seed", 0))[0] == 0
    attrs = study_of(first).user_attrs
    storage = f"sqlite:///{second / 'sweeps' / 'sweep' / 'study.db'}"
    (second / "sweeps" / "sweep").mkdir(parents=True)
    made = optuna.create_study(study_name="sweep", storage=storage, direction="maximize")

    def record_later() -> None:
        time.sleep(1.5)
        for key, value in attrs.items():
            made.set_user_attr(key, value)

    recorder = threading.Thread(target=record_later)
    recorder.start()
    try:
        code, out, err = run_cli(*sweep_args(prepared, second, "--trials", 1, "--seed", 0))
    finally:
        recorder.join()
    assert code == 0, err
    assert states(study_of(second)) == ["COMPLETE"]
