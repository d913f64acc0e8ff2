"""The store: commits that change a folder's files in one step, the writer's lock, readers that
never see a commit half done, and JSON reads."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Crash, crash_at, leftovers
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.diskfiles import read_json
from mnistsum_cli.store.journal import GENERATION, JOURNAL
from mnistsum_cli.store.locks import LOCK, FolderInUse, folder_lock
from mnistsum_cli.store.reads import read_consistently
from mnistsum_cli.store.transactions import commit, write_json

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

REPO = Path(__file__).resolve().parents[1]


def contents(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): p.read_text()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".mnistsum-")
    }


# --------------------------------------------------------------------------- commits


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failed_change_keeps_every_previous_file_and_leaves_no_temp(tmp_path: Path, error: BaseException) -> None:
    with commit(tmp_path) as change:
        change.write_json("train_state.json", {"version": 1})
        change.write_json("history.json", {"version": 1})
    before = contents(tmp_path)
    with pytest.raises(type(error)):
        with commit(tmp_path) as change:
            change.write_json("train_state.json", {"version": 2})
            raise error
    assert contents(tmp_path) == before
    assert leftovers(tmp_path) == []


def test_a_full_disk_is_one_line_naming_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mnistsum_cli.store.transactions

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mnistsum_cli.store.transactions, "write_file", full)
    with pytest.raises(
        MnistsumError, match=rf"cannot write {tmp_path / 'sub'}/: No space left on device; nothing was changed"
    ):
        write_json(tmp_path / "sub" / "config.json", {"x": 1})
    assert not (tmp_path / "sub" / "config.json").exists()


def test_a_change_replaces_files_and_bumps_the_generation(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {"v": 1})
    first = (tmp_path / GENERATION).read_bytes()
    write_json(tmp_path / "config.json", {"v": 2})
    assert json.loads((tmp_path / "config.json").read_text()) == {"v": 2}
    assert (tmp_path / GENERATION).read_bytes() != first
    assert leftovers(tmp_path) == []


def test_new_files_and_folders_get_the_usual_modes(tmp_path: Path) -> None:
    """Temporary files are not 0600 nor folders 0700: what the tool makes follows the umask."""
    umask = os.umask(0)
    os.umask(umask)
    (tmp_path / "model.safetensors").write_text("{}")
    with commit(tmp_path) as change:
        change.write_json("train_state.json", {"x": 1})
        staged = change.folder_of("plots")
        from mnistsum_cli.store.writes import write_file

        write_file(staged / "p.png", b"png")
        change.move(tmp_path / "model.safetensors", tmp_path / "previous" / "run1" / "model.safetensors")
    for name in ("train_state.json", "plots/p.png", "previous/run1/model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    for name in ("plots", "previous", "previous/run1"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o777 & ~umask, name


def test_read_json_errors_name_the_stage(tmp_path: Path) -> None:
    with pytest.raises(MnistsumError, match="mnistsum train"):
        read_json(tmp_path / "history.json", stage="train")
    (tmp_path / "bad.json").write_bytes(b'{"a": \xff')
    with pytest.raises(MnistsumError, match="mnistsum evaluate"):
        read_json(tmp_path / "bad.json", stage="evaluate")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)  # json's recursion limit
    with pytest.raises(MnistsumError, match="deep.json is unreadable .*mnistsum plot"):
        read_json(tmp_path / "deep.json", stage="plot")


# --------------------------------------------------------------------------- a crash at every write and rename


def _change(folder: Path, version: int) -> None:
    """Two files replaced, a folder replaced, a file moved to a fresh name: every kind of step."""
    with commit(folder) as change:
        if (folder / "model.safetensors").exists():
            change.move(folder / "model.safetensors", folder / "previous" / f"v{version}" / "model.safetensors")
        change.write(folder / "train_state.json", f"a{version}".encode())
        change.write(folder / "history.json", f"b{version}".encode())
        from mnistsum_cli.store.writes import write_file

        staged = change.folder_of(folder / "plots")
        write_file(staged / "loss.png", f"p{version}".encode())


def test_a_crash_at_any_step_leaves_before_or_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash at the 1st, 2nd, ... write or rename of a change; after the next writer took the
    lock the folder is as before or as after the change, with no temporary file left."""
    first = tmp_path / "first"
    first.mkdir()
    (first / "model.safetensors").write_text("keep me")
    _change(first, 1)
    (first / "model.safetensors").write_text("keep me too")
    before = contents(first)
    reference = tmp_path / "reference"
    shutil.copytree(first, reference)
    _change(reference, 2)
    after = contents(reference)
    total, step, outcomes = None, 1, []
    while total is None or step <= total:
        trial = tmp_path / f"crash-at-{step}"
        shutil.copytree(first, trial)
        with monkeypatch.context() as patch:
            steps = crash_at(patch, step)
            try:
                _change(trial, 2)
                total = len(steps)
            except Crash:
                pass
        with folder_lock(trial, "test", "--x"):  # the next writer
            pass
        state = contents(trial)
        assert state in (before, after), f"crash at step {step} ({steps[-1]}): {state}"
        outcomes.append("after" if state == after else "before")
        assert leftovers(trial) == [], f"step {step}"
        step += 1
    # writes: 3 staged files, generation, journal; renames: journal, move, 3 installs (+1 folder set aside), generation
    assert total >= 10
    assert outcomes == sorted(outcomes, key=["before", "after"].index), "once after, always after"
    assert outcomes[0] == "before" and outcomes[-1] == "after"


# --------------------------------------------------------------------------- the lock


def _hold_lock_in_another_process(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom mnistsum_cli.store.locks import folder_lock\n"
        f"with folder_lock(Path({str(folder)!r}), 'train', '--artifacts'):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    holder = _hold_lock_in_another_process(tmp_path / "artifacts")
    try:
        with pytest.raises(FolderInUse) as caught:
            with folder_lock(tmp_path / "artifacts", "evaluate", "--artifacts"):
                pass
        assert str(caught.value) == (
            f"{tmp_path / 'artifacts'}/ is in use by mnistsum train (pid {holder.pid}); wait for it or use another --artifacts"
        )
    finally:
        holder.kill()
        holder.wait()
    # a killed holder holds nothing: the OS released its lock
    with folder_lock(tmp_path / "artifacts", "evaluate", "--artifacts"):
        assert (tmp_path / "artifacts" / LOCK).read_text() == f"{os.getpid()} evaluate\n"


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    with folder_lock(tmp_path, "run", "--data"), folder_lock(tmp_path, "prepare", "--data"):
        write_json(tmp_path / "config.json", {"x": 1})
    assert (tmp_path / LOCK).read_text() == f"{os.getpid()} run\n"


# --------------------------------------------------------------------------- readers


def test_a_reader_retries_when_a_commit_overlaps_its_read(tmp_path: Path) -> None:
    write_json(tmp_path / "train_state.json", 1)
    write_json(tmp_path / "history.json", 1)
    reads = []

    def read() -> tuple[int, int]:
        a = json.loads((tmp_path / "train_state.json").read_text())
        if not reads:  # a writer commits between the reader's two files, once
            with commit(tmp_path) as change:
                change.write_json("train_state.json", 2)
                change.write_json("history.json", 2)
        reads.append(a)
        return a, json.loads((tmp_path / "history.json").read_text())

    assert read_consistently(tmp_path, read) == (2, 2)
    assert len(reads) == 2


def test_a_reader_never_accepts_a_commit_that_ends_between_its_closing_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bad interleaving, forced: read() sees the old train_state, then a commit installs the
    new files (its journal still in place, its generation not yet), read() sees the new history;
    the commit ends (generation installed, journal gone) right after the reader's closing check
    read the generation. Looking for the journal first catches it; the other order accepts a mix."""
    import mnistsum_cli.store.reads

    write_json(tmp_path / "train_state.json", 10)
    write_json(tmp_path / "history.json", 10)
    real_token = mnistsum_cli.store.reads._generation_token
    pending = []

    def token_then_the_writer_finishes(folder: Path) -> bytes:
        token = real_token(folder)
        if pending:  # preempted here: the writer installs its generation and removes its journal
            pending.clear()
            with folder_lock(folder, "train", "--artifacts"):
                pass
        return token

    def read() -> tuple[int, int]:
        state = json.loads((tmp_path / "train_state.json").read_text())
        if state == 10 and not pending:
            with monkeypatch.context() as patch:
                steps = crash_at(patch, 8)  # 4 writes, the journal in, 2 installs: crash at the generation
                with pytest.raises(Crash):
                    with commit(tmp_path) as change:
                        change.write_json("train_state.json", 11)
                        change.write_json("history.json", 11)
            assert steps[-1] == "replace" and (tmp_path / JOURNAL).exists()
            pending.append(True)
        return state, json.loads((tmp_path / "history.json").read_text())

    monkeypatch.setattr(mnistsum_cli.store.reads, "_generation_token", token_then_the_writer_finishes)
    assert read_consistently(tmp_path, read) == (11, 11)


def test_a_reader_finishes_the_commit_of_a_killed_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_json(tmp_path / "train_state.json", 1)
    with monkeypatch.context() as patch:
        steps = crash_at(
            patch, 5
        )  # train_state.json, generation and journal staged, journal in place, crash at the first rename
        with pytest.raises(Crash):
            write_json(tmp_path / "train_state.json", 2)
        assert steps == ["write", "write", "write", "replace", "replace"]
    assert (tmp_path / JOURNAL).exists()
    assert read_consistently(tmp_path, lambda: json.loads((tmp_path / "train_state.json").read_text())) == 2
    assert leftovers(tmp_path) == []


def test_a_reader_waits_for_a_live_writer_then_reads(tmp_path: Path) -> None:
    write_json(tmp_path / "train_state.json", 1)
    holder = _hold_lock_in_another_process(tmp_path)
    (tmp_path / JOURNAL).write_text(json.dumps({"operations": []}))  # the holder is committing
    try:
        import threading

        threading.Timer(0.3, lambda: (tmp_path / JOURNAL).unlink()).start()  # the writer's commit ends
        assert read_consistently(tmp_path, lambda: json.loads((tmp_path / "train_state.json").read_text())) == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
