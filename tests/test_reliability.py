"""Never lose a run: a crash at every write and rename of an epoch commit (with the previous run
set aside in it), a prepare and a plot leaves the folder before or after the change, `status`
says which, and `--resume` continues; a full disk, a read-only folder, a name too long or a
denied permission are one line with everything as it was; two `train` into one folder cannot
both run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import VAL_SIZE, Crash, FakeMnist, assert_one_line_error, crash_at, leftovers, mnistsum_process, snapshot
from mnistsum_cli.data.mnist import load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.pipeline import CURRENT, INCOMPLETE, status
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.locks import LOCK, folder_lock
from mnistsum_cli.store.paths import DataDir, RunDir
from mnistsum_cli.store.splits import read_dataset
from mnistsum_cli.training.checkpoint import Learner, load_model
from mnistsum_cli.training.loop import load_train_data, make_optimizer, train
from mnistsum_cli.training.models import build_model
from mnistsum_cli.training.run import Run, aside_folder

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

CPU = torch.device("cpu")
CONFIG = TrainConfig(arch="fastnet-small", epochs=2, batch_size=64, lr=4e-3, max_shift=2, seed=0)
REPO = Path(__file__).resolve().parents[1]


class StopAfter:
    """A reporter that presses Ctrl-C once epoch `epoch` is saved."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_start(self, *args) -> None:
        pass

    def step(self) -> None:
        pass

    def epoch_end(self, record) -> None:
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def world(fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A dataset, a complete 2-epoch run, and a run of other settings stopped after epoch 1."""
    root = tmp_path_factory.mktemp("reliability")
    mnist = load_mnist(resolve_source(fake_mnist.root))
    data = DataDir(root / "data")
    prepare(mnist, PrepareOptions(seed=0, val_size=VAL_SIZE), data)
    train_data = load_train_data(SplitData(data, mnist=mnist), CPU)
    complete, half = RunDir(root / "complete"), RunDir(root / "half")
    train(CONFIG, train_data, complete, CPU)
    with pytest.raises(KeyboardInterrupt):
        train(replace(CONFIG, seed=1), train_data, half, CPU, reporter=StopAfter(1))
    return {"root": root, "mnist": mnist, "data": data, "train_data": train_data, "complete": complete, "half": half}


def _captured_commit(world: dict, base: RunDir, config: TrainConfig, epoch: int, resume: bool) -> tuple:
    """Train a copy of `base` up to the commit of `epoch` and return that commit (the run and
    the learner frozen as they were) instead of running it, to replay it once per crash point."""
    work = RunDir(world["root"] / f"capture-{base.root.name}-{epoch}")
    shutil.rmtree(work.root, ignore_errors=True)
    shutil.copytree(base.root, work.root)
    captured = {}

    def capture(run: Run, learner: Learner, improved: bool) -> None:
        if run.epoch == epoch:
            captured.update(run=run, learner=learner, improved=improved)
            raise Crash("captured")
        return real(run, learner, improved)

    real = Run.write_epoch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "write_epoch", capture)
        with pytest.raises(Crash):
            train(config, world["train_data"], work, CPU, resume=resume, aside=None if resume else aside_folder(work))
    shutil.rmtree(work.root)
    return captured


def _train_state(world: dict, run: RunDir) -> tuple[str, dict]:
    stages = {stage.stage: stage for stage in status(SplitData(world["data"]), run)}
    return stages["train"].state, stages["train"].figures


def _resumable_epoch(world: dict, run: RunDir, config: TrainConfig) -> tuple[str, int]:
    """What `train --resume` would continue from: (run id, epoch), through its own loader."""
    model = build_model(config.arch)
    learner = Learner(model, make_optimizer(model, config), torch.amp.GradScaler("cpu", enabled=False))
    resumed = Run.resume(run, learner, config, world["train_data"].dataset_id, {"world_size": 1, "backend": None})
    return resumed.run_id, resumed.epoch


def _crash_every_step(source: Path, trials: Path, change, check) -> list[str]:
    """Crash `change(trial)` at its 1st, 2nd, ... write or rename (until it runs to the end),
    each time on a fresh copy of `source` named TRIALS-STEP; after each, the next writer takes
    the lock, then `check(trial)` says "before" or "after"."""
    outcomes, total, step = [], None, 1
    while total is None or step <= total:
        trial = trials.with_name(f"{trials.name}-{step}")
        shutil.copytree(source, trial)
        with pytest.MonkeyPatch.context() as patch:
            steps = crash_at(patch, step)
            try:
                change(trial)
                total = len(steps)
            except Crash:
                pass
        with folder_lock(trial, "next writer", "--artifacts"):
            pass
        assert leftovers(trial) == [], f"crash at step {step} ({steps[-1]})"
        outcomes.append(check(trial, f"crash at step {step} ({steps[-1]})"))
        step += 1
    assert outcomes[0] == "before" and outcomes[-1] == "after"
    assert outcomes == sorted(outcomes, key=["before", "after"].index), "once after, always after"
    return outcomes


# --------------------------------------------------------------------------- epoch commits


def test_a_crash_in_the_first_epoch_commit_of_a_new_run(world: dict) -> None:
    """The commit that saves epoch 1 of a new run and sets the complete previous run aside: at
    every crash point the previous run is whole (in place, or in previous/<id>/)."""
    complete: RunDir = world["complete"]
    previous_files = {name: data for name, data in snapshot(complete.root).items()}
    previous_id = json.loads(complete.train_state.read_text())["run_id"]
    new_config = replace(CONFIG, seed=5)
    args = _captured_commit(world, complete, new_config, epoch=1, resume=False)

    def change(trial: Path) -> None:
        aside = trial / "previous" / args["run"].aside.name
        replace(args["run"], folder=RunDir(trial), aside=aside).write_epoch(args["learner"], args["improved"])

    def check(trial: Path, where: str) -> str:
        run = RunDir(trial)
        state, figures = _train_state(world, run)
        if (trial / "previous").exists():  # after: the new run's epoch 1, the old run whole beside it
            assert snapshot(trial / "previous" / previous_id) == previous_files, where
            assert (state, figures["epochs"]) == (INCOMPLETE, 1), where
            assert _resumable_epoch(world, run, new_config) == (args["run"].run_id, 1), where
            load_model(run.model, CPU)
            return "after"
        assert {name: data for name, data in snapshot(trial).items()} == previous_files, where
        assert (state, figures["epochs"]) == (CURRENT, 2), where
        assert _resumable_epoch(world, run, CONFIG) == (previous_id, 2), where
        return "before"

    _crash_every_step(complete.root, world["root"] / "first", change, check)


def test_a_crash_in_a_later_epoch_commit_then_resume(world: dict, run_cli) -> None:
    half: RunDir = world["half"]
    config = replace(CONFIG, seed=1)
    run_id = json.loads(half.train_state.read_text())["run_id"]
    args = _captured_commit(world, half, config, epoch=2, resume=True)

    def change(trial: Path) -> None:
        replace(args["run"], folder=RunDir(trial)).write_epoch(args["learner"], args["improved"])

    def check(trial: Path, where: str) -> str:
        run = RunDir(trial)
        state, figures = _train_state(world, run)
        epoch = _resumable_epoch(world, run, config)[1]
        assert state == (CURRENT if epoch == 2 else INCOMPLETE) and figures["epochs"] == epoch, where
        assert _resumable_epoch(world, run, config) == (run_id, epoch), where
        load_model(run.model, CPU)
        return "after" if epoch == 2 else "before"

    outcomes = _crash_every_step(half.root, world["root"] / "later", change, check)
    # the real command continues from the last "before" state
    last_before = world["root"] / f"later-{outcomes.count('before')}"
    code, out, err = run_cli("train", "--resume", "--cpu", "--data", world["data"].root, "--artifacts", last_before)
    assert code == 0, err
    assert json.loads((last_before / "train_state.json").read_text())["epoch"] == 2


# --------------------------------------------------------------------------- prepare and plot


def test_a_crash_in_prepare_keeps_one_whole_dataset(world: dict) -> None:
    old = read_dataset(world["data"]).dataset_id
    new_options = PrepareOptions(seed=7, val_size=VAL_SIZE)

    def check(trial: Path, where: str) -> str:
        dataset = read_dataset(DataDir(trial))  # all three splits of one prepare run, or an error
        assert dataset.meta["seed"] == (0 if dataset.dataset_id == old else 7), where
        return "before" if dataset.dataset_id == old else "after"

    _crash_every_step(
        world["data"].root,
        world["root"] / "prepare",
        lambda trial: prepare(world["mnist"], new_options, DataDir(trial)),
        check,
    )


def test_a_crash_in_plot_keeps_one_whole_set_of_plots(workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import mnistsum_cli.evaluation.plot
    from mnistsum_cli.evaluation.plot import plot

    monkeypatch.setattr(
        mnistsum_cli.evaluation.plot, "png_bytes", lambda figure: b"PNG of " + figure.get_suptitle().encode()
    )  # fast

    artifacts = workdir / "artifacts"
    evaluation = artifacts / "evaluation_test.json"
    evaluation.rename(workdir / "evaluation_test.json")
    assert run_cli("plot")[0] == 0  # curves only
    (workdir / "evaluation_test.json").rename(evaluation)
    before = snapshot(artifacts / "plots")
    reference = workdir / "reference"
    shutil.copytree(artifacts, reference)
    plot(RunDir(reference))
    after = snapshot(reference / "plots")
    assert set(after) > set(before)

    def check(trial: Path, where: str) -> str:
        plots = snapshot(trial / "plots")
        assert plots in (before, after), where
        return "before" if plots == before else "after"

    _crash_every_step(artifacts, workdir / "plot", lambda trial: plot(RunDir(trial)), check)


def test_a_reader_never_mixes_splits_of_two_prepare_runs(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prepare` commits between a reader's train and val reads: the reader starts again and
    gets one dataset, never train of one run beside val of the other."""
    import mnistsum_cli.store.splits

    data = DataDir(world["root"] / "reader")
    shutil.copytree(world["data"].root, data.root)
    real_read = mnistsum_cli.store.splits.read_split
    reads = []

    def read_then_prepare(folder: DataDir, name: str):
        split = real_read(folder, name)
        reads.append(name)
        if reads == ["train"]:
            prepare(world["mnist"], PrepareOptions(seed=8, val_size=VAL_SIZE), data)
        return split

    monkeypatch.setattr(mnistsum_cli.store.splits, "read_split", read_then_prepare)
    dataset = read_dataset(data)
    assert reads == ["train", "val", "test"] * 2, "read again, whole"
    assert {split.meta["seed"] for split in dataset.splits.values()} == {8}


# --------------------------------------------------------------------------- the system says no


@pytest.mark.parametrize(
    "code, cause",
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EROFS, "Read-only file system"),
        (errno.ENAMETOOLONG, "File name too long"),
        (errno.EACCES, "Permission denied"),
    ],
)
def test_train_that_cannot_write_is_one_line_and_changes_nothing(
    workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch, code: int, cause: str
) -> None:
    import mnistsum_cli.store.transactions

    before = snapshot(workdir / "artifacts")

    def refused(path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as patch:
        patch.setattr(mnistsum_cli.store.transactions, "write_file", refused)
        exit_code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--seed", 4)
    assert exit_code == 1
    line = assert_one_line_error(err, out)
    assert f"cannot write artifacts/: {cause}; nothing was changed" in line, line
    assert snapshot(workdir / "artifacts") == before, "the previous run stays, whole, where it was"
    code_, out, err = run_cli("status", "--json")
    assert {stage["stage"]: stage["state"] for stage in json.loads(out)}["train"] == CURRENT


def test_prepare_on_a_full_disk_keeps_the_dataset(
    workdir: Path, fake_mnist: FakeMnist, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnistsum_cli.store.transactions

    before = snapshot(workdir / "data")
    real_write = mnistsum_cli.store.transactions.write_file
    calls = []

    def full_at_the_second_split(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            real_write(path, data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(mnistsum_cli.store.transactions, "write_file", full_at_the_second_split)
    code, out, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--seed", 3)
    assert code == 1
    assert "cannot write data/: No space left on device; nothing was changed" in assert_one_line_error(err, out)
    assert snapshot(workdir / "data") == before
    assert leftovers(workdir / "data") == []


def test_a_folder_name_too_long_is_one_line(workdir: Path, run_cli) -> None:
    long_name = workdir / ("a" * 300)
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--artifacts", long_name)
    assert code == 1
    assert "File name too long" in assert_one_line_error(err, out)


def test_a_rename_refused_after_the_journal_is_finished_by_the_next_writer(
    workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk refuses the renames once the journal is in place: one line saying the change is
    recorded; the next command that writes the folder finishes it."""
    import mnistsum_cli.store.transactions

    real_replace = os.replace

    def refuse_installs(source, target):
        if Path(target).name != ".mnistsum-journal.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(mnistsum_cli.store.transactions.os, "replace", refuse_installs)
        code, out, err = run_cli("evaluate", "--cpu", "--split", "val")
    assert code == 1
    assert (
        "the change is recorded and the next mnistsum command that writes artifacts/ finishes it"
        in assert_one_line_error(err, out)
    )
    code, out, err = run_cli("status", "--json")  # a reader finishes it (no writer is alive)
    assert code == 0, err
    assert (workdir / "artifacts" / "evaluation_val.json").exists()
    assert leftovers(workdir / "artifacts") == []


def test_stale_temporaries_are_removed_by_the_next_writer(workdir: Path, run_cli) -> None:
    artifacts = workdir / "artifacts"
    (artifacts / ".mnistsum-tmp.dead0001.1").write_bytes(b"half a model")
    (artifacts / ".mnistsum-tmp.dead0001.2").mkdir()
    (artifacts / ".mnistsum-tmp.dead0001.2" / "loss.png").write_bytes(b"\x89PNG half")
    code, out, err = run_cli("plot")
    assert code == 0, err
    assert leftovers(artifacts) == []


# --------------------------------------------------------------------------- resume of a finished run


@pytest.mark.parametrize("damage", ["none", "read-only", "empty model"])
def test_resume_of_a_finished_run_does_nothing(
    workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    import mnistsum_cli.store.transactions

    artifacts = workdir / "artifacts"
    if damage == "empty model":
        (artifacts / "model.safetensors").write_bytes(b"")
    if damage == "read-only":  # root ignores file modes: refuse at the store instead
        real_open = os.open

        def read_only(path, flags, *args, **kwargs):  # a read-only file system still reads
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(mnistsum_cli.store.transactions.os, "open", read_only)
    before = snapshot(artifacts)
    code, out, err = run_cli("train", "--resume", "--cpu")
    assert code == 0, err
    assert "the run in artifacts is complete (1 of 1 epochs): nothing was done" in out
    assert "wrote" not in out
    assert snapshot(artifacts) == before


# --------------------------------------------------------------------------- two processes


def test_two_train_processes_into_one_folder(workdir: Path, run_cli) -> None:
    """The second `train` is refused at once, naming the first; the first is untouched by it.
    Then SIGKILL the first mid-run: its lock goes with it, `status` tells the truth about the
    last saved epoch and `train --resume` finishes the run."""
    artifacts = workdir / "A"
    first = mnistsum_process(
        "train", "--preset", "cpu", "--cpu", "--epochs", 30, "--batch-size", 16, "--artifacts", artifacts
    )
    try:
        deadline = time.monotonic() + 120
        while not (artifacts / "train_state.json").exists():  # epoch 1 is saved: the first is well under way
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = mnistsum_process(
            "train", "--preset", "cpu", "--cpu", "--epochs", 2, "--seed", 7, "--artifacts", artifacts
        )
        out, err = second.communicate(timeout=120)
        assert second.returncode == 1
        assert assert_one_line_error(err, out) == (
            f"error: {artifacts}/ is in use by mnistsum train (pid {first.pid}); wait for it or use another --artifacts"
        )
        assert not (artifacts / "previous").exists(), "the second moved nothing"
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    saved = json.loads((artifacts / "train_state.json").read_text())["epoch"]
    code, out, err = run_cli("status", "--json", "--artifacts", artifacts)
    train_stage = {stage["stage"]: stage for stage in json.loads(out)}["train"]
    assert train_stage["state"] == INCOMPLETE and train_stage["figures"]["epochs"] == saved
    assert f"stopped after epoch {saved} of 30" in train_stage["detail"]
    assert (artifacts / LOCK).exists()
    code, out, err = run_cli("train", "--resume", "--cpu", "--epochs", 30, "--artifacts", artifacts)
    assert code == 0, err
    assert json.loads((artifacts / "train_state.json").read_text())["epoch"] == 30


# --------------------------------------------------------------------------- a real small or read-only disk


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs (needs root and the right to mount: skipped elsewhere); unmounted after."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount_point], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", "-l", mount_point], check=True)


def test_a_real_full_disk_and_a_real_read_only_folder(workdir: Path, small_disk: Path, run_cli) -> None:
    artifacts = small_disk / "artifacts"
    shutil.copytree(workdir / "artifacts", artifacts)
    before = snapshot(artifacts)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # room for the lock, not for an epoch
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--seed", 6, "--artifacts", artifacts)
    assert code == 1
    assert f"cannot write {artifacts}/: No space left on device; nothing was changed" in assert_one_line_error(err, out)
    assert snapshot(artifacts) == before and leftovers(artifacts) == []

    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", small_disk], check=True)
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--seed", 6, "--artifacts", artifacts)
    assert code == 1
    assert f"cannot write {artifacts}/: Read-only file system; nothing was changed" in assert_one_line_error(err, out)
    code, out, err = run_cli("train", "--resume", "--cpu", "--artifacts", artifacts)
    assert code == 0 and "is complete (1 of 1 epochs): nothing was done" in out, err
    code, out, err = run_cli("status", "--json", "--artifacts", artifacts)
    assert code == 0 and {s["stage"]: s["state"] for s in json.loads(out)}["train"] == CURRENT
    assert snapshot(artifacts) == before
