"""A folder someone else prepared (a shared drive, a downloaded run): a planted journal, lock,
generation, temporary file or link can make no command touch a file outside the folder, nor
lose a file inside it; what blocks a change is set aside, and what cannot be finished says
why in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VAL_SIZE, FakeMnist, assert_one_line_error, leftovers, snapshot
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.pipeline import CURRENT
from mnistsum_cli.store.journal import GENERATION, JOURNAL
from mnistsum_cli.store.locks import LOCK, FolderInUse, folder_lock
from mnistsum_cli.store.paths import RunDir, is_run_id
from mnistsum_cli.store.recovery import recover
from mnistsum_cli.store.writes import TEMP_PREFIX

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def outside(workdir: Path) -> Path:
    """Files beside the artifacts folder that no command may change: outside/precious.txt, an
    empty outside/victim/."""
    folder = workdir / "outside"
    (folder / "victim").mkdir(parents=True)
    (folder / "precious.txt").write_bytes(b"precious\n")
    (folder / "evil.txt").write_bytes(b"evil\n")
    return folder


def state_of(folder: Path) -> dict[str, tuple[bytes, int] | str]:
    """Every entry under `folder`: a file's bytes and mtime, a folder or link as such (links not followed)."""
    entries: dict[str, tuple[bytes, int] | str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            entries[name] = f"link to {os.readlink(path)}"
        elif path.is_dir():
            entries[name] = "folder"
        else:
            entries[name] = (path.read_bytes(), path.stat().st_mtime_ns)
    return entries


def plant_journal(folder: Path, operations: list) -> bytes:
    data = json.dumps({"operations": operations}).encode()
    (folder / JOURNAL).write_bytes(data)
    return data


def escaping_journal(outside: Path) -> list:
    return [
        ["install", "../outside/evil.txt", "../outside/precious.txt"],
        ["move", str(outside / "precious.txt"), str(outside / "victim" / "stolen.txt")],
    ]


def serve_start(artifacts: Path) -> None:
    """What `serve` does at start-up: read the run's model (reads.read_consistently)."""
    pytest.importorskip("starlette")
    import torch

    from mnistsum_cli.serve.follower import ModelFollower

    ModelFollower(RunDir(artifacts), torch.device("cpu"))


# --------------------------------------------------------------------------- a planted journal


@pytest.mark.parametrize("command", ["status", "evaluate", "train", "serve"])
def test_a_journal_naming_files_outside_is_refused_whole(workdir: Path, outside: Path, run_cli, command: str) -> None:
    artifacts = workdir / "artifacts"
    planted = plant_journal(artifacts, escaping_journal(outside))
    before_outside, before = state_of(outside), snapshot(artifacts)
    if command == "serve":
        with pytest.raises(MnistsumError, match="is not a journal mnistsum writes") as caught:
            serve_start(artifacts)
        line = str(caught.value)
    else:
        args = {
            "status": ["status"],
            "evaluate": ["evaluate", "--cpu"],
            "train": ["train", "--cpu", "--preset", "cpu", "--epochs", 1],
        }
        code, out, err = run_cli(*args[command])
        assert code == 1, (out, err)
        line = assert_one_line_error(err, out)
    assert f"{JOURNAL} is not a journal mnistsum writes (entry 1 installs from '../outside/evil.txt'" in line, line
    assert "nothing of it was applied" in line and "remove it" in line
    assert state_of(outside) == before_outside, "nothing outside the folder changed"
    assert sorted(p.name for p in workdir.iterdir()) == ["artifacts", "data", "outside"], "nothing made beside it"
    assert snapshot(artifacts) == before and (artifacts / JOURNAL).read_bytes() == planted, "left alone"


def test_a_journal_is_checked_whole_before_any_entry_runs(workdir: Path, outside: Path, run_cli) -> None:
    """A first entry that a commit could write does not run when a later one is refused."""
    artifacts = workdir / "artifacts"
    (artifacts / f"{TEMP_PREFIX}dead.1").write_bytes(b"not a model")
    plant_journal(
        artifacts,
        [
            ["move", "model.safetensors", "previous/abc/model.safetensors"],
            ["install", f"{TEMP_PREFIX}dead.1", "history.json"],
            ["install", f"{TEMP_PREFIX}dead.1", "../outside/precious.txt"],
        ],
    )
    before, before_outside = snapshot(artifacts), state_of(outside)
    code, out, err = run_cli("status")
    assert code == 1
    assert "entry 3 installs onto '../outside/precious.txt'" in assert_one_line_error(err, out)
    assert snapshot(artifacts) == before and not (artifacts / "previous").exists()
    assert state_of(outside) == before_outside


@pytest.mark.parametrize(
    "entry, why",
    [
        (["install", ".mnistsum-tmp.x", "/etc/passwd"], "installs onto '/etc/passwd'"),
        (["install", ".mnistsum-tmp.x/../../x", "model.safetensors"], "installs from '.mnistsum-tmp.x/../../x'"),
        (["install", "model.safetensors", "history.json"], "installs from 'model.safetensors'"),
        (["install", ".mnistsum-tmp.x", "plots/manifest.json"], "installs onto 'plots/manifest.json'"),
        (["move", "model.safetensors", "previous/../model.safetensors"], "out of previous/"),
        (["move", "model.safetensors", "previous/a/b/model.safetensors"], "not a run file to previous/<run id>/"),
        (["move", "model.safetensors", "previous/a/history.json"], "not a run file to previous/<run id>/"),
        (["move", "../x", "previous/a/x"], "moves '../x'"),
        (["rename", "a", "b"], "'rename' is neither"),
        (["install", ".mnistsum-tmp.x"], "not a [kind, source, target]"),
    ],
)
def test_each_kind_of_foreign_entry_is_refused(tmp_path: Path, entry: list, why: str) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"model")
    plant_journal(tmp_path, [entry])
    before = state_of(tmp_path)
    with pytest.raises(MnistsumError, match="is not a journal mnistsum writes") as caught:
        recover(tmp_path)
    assert why in str(caught.value)
    assert state_of(tmp_path) == before


def _kept_run(artifacts: Path, name: str = "abc") -> Path:
    """A copy of the current run's history and model in previous/<name>/."""
    kept = artifacts / "previous" / name
    kept.mkdir(parents=True)
    for file in ("history.json", "model.safetensors"):
        (kept / file).write_bytes((artifacts / file).read_bytes())
    return kept


@pytest.mark.parametrize("journal", ["escaping", "one a commit could write"])
def test_runs_never_runs_a_journal_planted_in_a_kept_run(workdir: Path, outside: Path, run_cli, journal: str) -> None:
    """No commit writes into previous/<run id>/: a journal there, even one that names only the
    run's own files, is someone else's. The run's row says so; nothing of it runs."""
    kept = _kept_run(workdir / "artifacts")
    if journal == "escaping":
        plant_journal(kept, escaping_journal(outside))
    else:
        (kept / f"{TEMP_PREFIX}x.1").write_bytes(b"not a history")
        plant_journal(kept, [["install", f"{TEMP_PREFIX}x.1", "history.json"]])
    before, before_outside = state_of(kept), state_of(outside)
    code, out, err = run_cli("runs", "--json")
    assert code == 0, err
    rows = {Path(row["folder"]).name: row for row in json.loads(out)}
    assert rows["abc"]["state"].startswith("unreadable: "), rows["abc"]
    assert "is not a journal mnistsum writes (a kept run, which no commit writes)" in rows["abc"]["state"]
    assert state_of(kept) == before and state_of(outside) == before_outside
    code, out, err = run_cli("compare", "artifacts/previous/abc")
    assert code == 1 and "a kept run, which no commit writes" in assert_one_line_error(err, out)
    assert state_of(kept) == before and state_of(outside) == before_outside


def test_runs_does_not_follow_a_link_in_previous(workdir: Path, outside: Path, run_cli) -> None:
    """previous/<link> to a run elsewhere (with a journal of its own) is not listed nor read."""
    elsewhere = _kept_run(workdir / "artifacts", "elsewhere")
    elsewhere = elsewhere.rename(outside / "run")
    (elsewhere / f"{TEMP_PREFIX}x.1").write_bytes(b"not a history")
    plant_journal(elsewhere, [["install", f"{TEMP_PREFIX}x.1", "history.json"]])
    (workdir / "artifacts" / "previous" / "linked").symlink_to(elsewhere)
    before_outside = state_of(outside)
    code, out, err = run_cli("runs", "--json")
    assert code == 0, err
    assert [Path(row["folder"]).name for row in json.loads(out)] == ["artifacts"]
    assert state_of(outside) == before_outside


@pytest.mark.parametrize("planted", ["link", "fifo"])
def test_a_journal_that_is_not_a_regular_file_is_refused(workdir: Path, outside: Path, run_cli, planted: str) -> None:
    """A link to a journal elsewhere is not followed; a FIFO is not waited on."""
    artifacts = workdir / "artifacts"
    elsewhere = outside / "journal.json"
    elsewhere.write_text(json.dumps({"operations": [["move", "model.safetensors", "previous/x/model.safetensors"]]}))
    if planted == "link":
        (artifacts / JOURNAL).symlink_to(elsewhere)
    else:
        os.mkfifo(artifacts / JOURNAL)
    before, before_outside = snapshot(artifacts), state_of(outside)
    result = subprocess.run(
        [sys.executable, "-m", "mnistsum_cli", "status"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    why = "a symbolic link" if planted == "link" else "not a regular file"
    assert f"is not a journal mnistsum writes ({why})" in assert_one_line_error(result.stderr, result.stdout)
    assert snapshot(artifacts) == before and state_of(outside) == before_outside


def test_a_generation_fifo_does_not_hang_a_reader(workdir: Path) -> None:
    (workdir / "artifacts" / GENERATION).unlink()
    os.mkfifo(workdir / "artifacts" / GENERATION)
    result = subprocess.run(
        [sys.executable, "-m", "mnistsum_cli", "status", "--json"],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert {stage["stage"]: stage["state"] for stage in json.loads(result.stdout)}["train"] == CURRENT


# --------------------------------------------------------------------------- links inside the folder


def test_a_previous_folder_linked_outside_is_never_moved_into(workdir: Path, outside: Path, run_cli) -> None:
    """A planted journal moving into previous/ (a link to outside) is refused; so is a new run,
    whose first commit would set the previous run aside there."""
    artifacts = workdir / "artifacts"
    (artifacts / "previous").symlink_to(outside / "victim")
    plant_journal(artifacts, [["move", "model.safetensors", "previous/abc/model.safetensors"]])
    before, before_outside = snapshot(artifacts), state_of(outside)
    code, out, err = run_cli("status")
    assert code == 1
    assert "moves model.safetensors into previous/, which is a symbolic link" in assert_one_line_error(err, out)
    assert snapshot(artifacts) == before and state_of(outside) == before_outside
    (artifacts / JOURNAL).unlink()
    before = snapshot(artifacts)
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--seed", 5)
    assert code == 1
    line = assert_one_line_error(err, out)
    assert "into previous/, which is a symbolic link); nothing was changed" in line, line
    assert snapshot(artifacts) == before and state_of(outside) == before_outside
    assert leftovers(artifacts) == []


@pytest.mark.parametrize("planted", ["link", "fifo", "folder"])
def test_a_lock_that_is_not_a_regular_file_is_refused(workdir: Path, outside: Path, run_cli, planted: str) -> None:
    artifacts = workdir / "artifacts"
    (artifacts / LOCK).unlink()
    if planted == "link":
        (artifacts / LOCK).symlink_to(outside / "precious.txt")
    elif planted == "fifo":
        os.mkfifo(artifacts / LOCK)
    else:
        (artifacts / LOCK).mkdir()
    before, before_outside = snapshot(artifacts), state_of(outside)
    code, out, err = run_cli("evaluate", "--cpu")
    assert code == 1
    line = assert_one_line_error(err, out)
    what = {"link": "a symbolic link, which mnistsum never makes", "fifo": "a FIFO", "folder": "a folder"}[planted]
    assert f"{LOCK} is {what}: nothing was changed; remove it to use artifacts/" in line, line
    assert snapshot(artifacts) == before and state_of(outside) == before_outside


@pytest.mark.parametrize("command", ["status", "evaluate"])
def test_a_lock_hard_linked_to_a_file_outside_is_never_written(
    workdir: Path, outside: Path, run_cli, command: str
) -> None:
    """A hard link is a regular file of the folder: the holder's pid would overwrite the file
    outside (status writes it too, to finish a planted journal)."""
    artifacts = workdir / "artifacts"
    (artifacts / LOCK).unlink()
    os.link(outside / "precious.txt", artifacts / LOCK)
    plant_journal(artifacts, [["install", "../x", "model.safetensors"]])
    before, before_outside = snapshot(artifacts), state_of(outside)
    code, out, err = run_cli(*{"status": ["status"], "evaluate": ["evaluate", "--cpu"]}[command])
    assert code == 1
    line = assert_one_line_error(err, out)
    assert f"{LOCK} is a hard link to another file: nothing was changed; remove it to use artifacts/" in line, line
    assert snapshot(artifacts) == before and state_of(outside) == before_outside
    assert (outside / "precious.txt").read_bytes() == b"precious\n"


def test_linked_temporaries_are_removed_as_links(workdir: Path, outside: Path, run_cli) -> None:
    artifacts = workdir / "artifacts"
    (artifacts / f"{TEMP_PREFIX}dead.1").symlink_to(outside / "victim")
    (artifacts / f"{TEMP_PREFIX}dead.2").symlink_to(outside / "precious.txt")
    (outside / "victim" / "keep.txt").write_text("keep")
    before_outside = state_of(outside)
    code, out, err = run_cli("evaluate", "--cpu", "--split", "val")
    assert code == 0, err
    assert leftovers(artifacts) == [] and state_of(outside) == before_outside


# --------------------------------------------------------------------------- what blocks a change


def _planted_epoch_commit(artifacts: Path, kept_name: str) -> dict[str, bytes]:
    """What a writer of an older version left after its first epoch commit failed past the
    commit point: the new run's files staged, a journal moving the previous run to
    previous/<kept_name>/ first. Returns the previous run's files."""
    previous = {name: (artifacts / name).read_bytes() for name in ("model.safetensors", "history.json")}
    operations = []
    for name in previous:
        operations.append(["move", name, f"previous/{kept_name}/{name}"])
    for number, name in enumerate(previous, 1):
        (artifacts / f"{TEMP_PREFIX}old.{number}").write_bytes(f"new {name}".encode())
        operations.append(["install", f"{TEMP_PREFIX}old.{number}", name])
    plant_journal(artifacts, operations)
    return previous


def test_a_run_id_the_file_system_refuses_gets_a_fresh_folder(workdir: Path, run_cli) -> None:
    artifacts = workdir / "artifacts"
    previous = _planted_epoch_commit(artifacts, "a" * 300)
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    assert "a name mnistsum does not make: it goes to previous/unknown-" in err
    (kept,) = (artifacts / "previous").iterdir()
    assert kept.name.startswith("unknown-")
    assert {name: (kept / name).read_bytes() for name in previous} == previous, "the previous run is whole"
    assert (artifacts / "model.safetensors").read_bytes() == b"new model.safetensors"
    assert leftovers(artifacts) == []


@pytest.mark.parametrize(
    "kept_name, shown",
    [
        ("a.b", "previous/a.b/"),
        ("a\tb\x1b[2J", "previous/a\\tb\\x1b[2J/"),
        ("a" * 300, "previous/" + "a" * 37 + ".../"),
    ],
)
def test_the_note_of_a_renamed_run_shows_its_name_plainly(workdir: Path, run_cli, kept_name: str, shown: str) -> None:
    _planted_epoch_commit(workdir / "artifacts", kept_name)
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    assert f"the interrupted change keeps a run in {shown}, a name mnistsum does not make" in " ".join(err.split())


def test_a_kept_name_the_file_system_took_stays_one_folder(workdir: Path, run_cli) -> None:
    """A journal of an older version into previous/<100 letters>/ (a name the file system takes
    but mnistsum no longer makes), killed after its first move: the rest of the run follows
    the first file into that folder, not into a fresh unknown-<time>/."""
    artifacts = workdir / "artifacts"
    name = "a" * 100
    previous = _planted_epoch_commit(artifacts, name)
    (artifacts / "previous" / name).mkdir(parents=True)
    (artifacts / "model.safetensors").rename(artifacts / "previous" / name / "model.safetensors")
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    assert [p.name for p in (artifacts / "previous").iterdir()] == [name]
    kept = artifacts / "previous" / name
    assert {file: (kept / file).read_bytes() for file in previous} == previous, (
        "the previous run is whole, in one folder"
    )
    assert (artifacts / "model.safetensors").read_bytes() == b"new model.safetensors"
    assert leftovers(artifacts) == []


def test_a_folder_where_a_file_goes_is_set_aside(workdir: Path, run_cli) -> None:
    artifacts = workdir / "artifacts"
    (artifacts / "config.json").unlink()
    (artifacts / "config.json").mkdir()
    (artifacts / "config.json" / "notes.txt").write_text("mine")
    (artifacts / f"{TEMP_PREFIX}old.1").write_bytes(b"{}")
    plant_journal(artifacts, [["install", f"{TEMP_PREFIX}old.1", "config.json"]])
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    (blocked,) = artifacts.glob(".mnistsum-blocked.*.config.json")
    assert f"was in the way of the change (a folder): kept as {blocked.relative_to(workdir)}" in err
    assert (blocked / "notes.txt").read_text() == "mine"
    assert (artifacts / "config.json").read_bytes() == b"{}"
    assert leftovers(artifacts) == []


def test_a_planted_file_at_a_moves_target_does_not_cost_the_file_it_moves(workdir: Path, run_cli) -> None:
    """previous/a/model.safetensors planted before a journal that moves the model there, then
    installs a new one: the user's model is set aside, not replaced by the install."""
    artifacts = workdir / "artifacts"
    model = (artifacts / "model.safetensors").read_bytes()
    (artifacts / "previous" / "a").mkdir(parents=True)
    (artifacts / "previous" / "a" / "model.safetensors").write_bytes(b"planted")
    (artifacts / f"{TEMP_PREFIX}x.1").write_bytes(b"new model")
    plant_journal(
        artifacts,
        [
            ["move", "model.safetensors", "previous/a/model.safetensors"],
            ["install", f"{TEMP_PREFIX}x.1", "model.safetensors"],
        ],
    )
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    (blocked,) = artifacts.glob(".mnistsum-blocked.*.model.safetensors")
    assert blocked.read_bytes() == model, "the user's model is kept"
    assert f"artifacts/model.safetensors is kept as {blocked.relative_to(workdir)}" in err
    assert (artifacts / "previous" / "a" / "model.safetensors").read_bytes() == b"planted"
    assert (artifacts / "model.safetensors").read_bytes() == b"new model"
    assert leftovers(artifacts) == []


def test_a_long_run_id_on_disk_does_not_brick_a_new_run(workdir: Path, run_cli) -> None:
    """A run id of 300 letters in train_state/history (hand-edited or planted) is not made a
    folder name: the new run keeps the previous one in previous/unknown-<time>/ and trains."""
    artifacts = workdir / "artifacts"
    for name in ("train_state.json", "history.json", "config.json"):
        data = json.loads((artifacts / name).read_text())
        (artifacts / name).write_text(json.dumps({**data, "run_id": "a" * 300}))
    previous = snapshot(artifacts)
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--seed", 5)
    assert code == 0, err
    (kept,) = (artifacts / "previous").iterdir()
    assert kept.name.startswith("unknown-")
    assert snapshot(kept) == previous, "the previous run is whole"
    code, out, err = run_cli("status", "--json")
    assert code == 0 and leftovers(artifacts) == []


@pytest.mark.parametrize("run_id", ["a/b", "..", "a\0b", "a" * 65, "ünï", "", 7, None])
def test_what_cannot_name_a_folder_is_no_run_id(run_id: object) -> None:
    assert not is_run_id(run_id)


def test_a_failure_to_finish_says_which_step_and_that_nothing_is_lost(
    workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    artifacts = workdir / "artifacts"
    previous = _planted_epoch_commit(artifacts, "abc")
    real_rename = os.rename

    def refused(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "rename", refused)
    code, out, err = run_cli("status")
    assert code == 1
    line = assert_one_line_error(err, out)
    assert (
        f"cannot finish the change recorded in artifacts/{JOURNAL} (entry 1, move model.safetensors -> "
        "previous/abc/model.safetensors: Input/output error): it stays recorded, nothing of it is lost" in line
    ), line
    assert "nothing was changed" not in line
    monkeypatch.setattr(os, "rename", real_rename)
    code, out, err = run_cli("status")
    assert code == 0, err
    assert {name: (artifacts / "previous" / "abc" / name).read_bytes() for name in previous} == previous


def test_a_reader_on_read_only_media_says_the_change_waits(
    workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader meets a journal it cannot finish (no lock can be written): nothing changes, and
    its line says the change waits for a writer, not that nothing was changed."""
    import errno

    artifacts = workdir / "artifacts"
    _planted_epoch_commit(artifacts, "abc")
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    before = snapshot(artifacts)
    code, out, err = run_cli("status")
    assert code == 1
    assert assert_one_line_error(err, out) == (
        "error: cannot write artifacts/: Read-only file system; an interrupted change waits for a command that "
        "can write it"
    )
    assert snapshot(artifacts) == before and (artifacts / JOURNAL).exists()


# --------------------------------------------------------------------------- temporaries of older versions


def test_temporaries_of_older_versions_are_removed_but_not_through_links(workdir: Path, outside: Path, run_cli) -> None:
    artifacts, data = workdir / "artifacts", workdir / "data"
    (artifacts / ".model.safetensors.k3j_9x2a.tmp").write_bytes(b"half a model")
    (artifacts / ".plots.ab12cd34.tmp").mkdir()
    (artifacts / ".plots.ab12cd34.tmp" / "loss.png").write_bytes(b"png")
    (artifacts / ".plots.0a1b2c3d.old").mkdir()
    (data / ".train.parquet.zz00yy11.tmp").write_bytes(b"half a split")
    (artifacts / ".history.json.abcd1234.tmp").symlink_to(outside / "precious.txt")
    (artifacts / ".notes.abcd1234.tmp").write_text("not an artifact's name: not ours")
    not_historic = [
        ".history.json.abcd1234.old",  # only the plots folder was replaced via .old
        ".plots.zz_z1234.old",  # .old had 8 hex digits
        ".model.safetensors.abcd1234.tmp",  # a folder: mkstemp made files
    ]
    (artifacts / not_historic[0]).write_text("mine")
    (artifacts / not_historic[1]).mkdir()
    (artifacts / not_historic[2]).mkdir()
    before_outside = state_of(outside)
    code, out, err = run_cli("evaluate", "--cpu", "--split", "val")
    assert code == 0, err
    with folder_lock(data, "test", "--data"):
        pass
    assert sorted(p.name for p in artifacts.glob(".*.tmp")) == [
        ".history.json.abcd1234.tmp",
        ".model.safetensors.abcd1234.tmp",
        ".notes.abcd1234.tmp",
    ]
    assert all((artifacts / name).exists() for name in not_historic)
    assert not (artifacts / ".plots.0a1b2c3d.old").exists()
    assert not (data / ".train.parquet.zz00yy11.tmp").exists()
    assert state_of(outside) == before_outside


# --------------------------------------------------------------------------- locks


def test_a_folder_reached_two_ways_is_one_lock(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    with folder_lock(tmp_path / "data", "run", "--data"), folder_lock(tmp_path / "link", "run", "--artifacts"):
        with folder_lock(tmp_path / "data" / ".." / "link", "train", "--artifacts"):
            pass
    assert (tmp_path / "data" / LOCK).read_text() == f"{os.getpid()} run\n"


def test_run_with_the_artifacts_a_link_to_the_data_folder(in_tmp: Path, fake_mnist: FakeMnist, run_cli) -> None:
    (in_tmp / "data").mkdir()
    (in_tmp / "link").symlink_to(in_tmp / "data")
    code, out, err = run_cli(
        "run", "--cpu", "--preset", "cpu", "--epochs", 1, "--val-size", VAL_SIZE, "--mnist-dir", fake_mnist.root,
        "--data", "data", "--artifacts", "link",
    )  # fmt: skip
    assert code == 0, err
    assert (in_tmp / "data" / "model.safetensors").is_file() and (in_tmp / "data" / "train.parquet").is_file()


def _prepare_held_open(data: Path, fake_mnist: FakeMnist, go: Path) -> subprocess.Popen:
    """`mnistsum prepare --data DATA` in another process, stopped after it took its lock (while
    it reads MNIST) until the file `go` appears."""
    code = (
        "import sys, time\nfrom pathlib import Path\nimport mnistsum_cli.data.mnist as mnist\nfrom mnistsum_cli.cli.app import main\n"
        "real = mnist.load_mnist\n"
        "def slow(source):\n"
        "    print('locked', flush=True)\n"
        f"    while not Path({str(go)!r}).exists():\n        time.sleep(0.02)\n"
        "    return real(source)\n"
        "mnist.load_mnist = slow\n"
        f"main(['prepare', '--mnist-dir', {str(fake_mnist.root)!r}, '--val-size', '{VAL_SIZE}', '--seed', '1', "
        f"'--data', {str(data)!r}])\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_prepares_into_a_new_folder(tmp_path: Path, fake_mnist: FakeMnist, run_cli) -> None:
    """The second is refused at once, naming the first, though the folder did not exist when
    the first started; the first writes its dataset."""
    data, go = tmp_path / "new" / "data", tmp_path / "go"
    first = _prepare_held_open(data, fake_mnist, go)
    try:
        assert first.stdout.readline().strip() == "locked", first.communicate()
        code, out, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--data", data)
        assert code == 1
        assert assert_one_line_error(err, out) == (
            f"error: {data}/ is in use by mnistsum prepare (pid {first.pid}); wait for it or use another --data"
        )
        assert sorted(p.name for p in data.iterdir()) == [LOCK], "the second wrote nothing"
        go.touch()
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        first.kill()
        first.wait()
    code, out, err = run_cli("status", "--json", "--data", data, "--artifacts", tmp_path / "artifacts")
    assert {stage["stage"]: stage["state"] for stage in json.loads(out)}["prepare"] == CURRENT


def test_a_refused_prepare_leaves_no_folder(tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("prepare", "--mnist-dir", tmp_path / "no-mnist", "--data", tmp_path / "new" / "data")
    assert code == 1
    assert_one_line_error(err, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_writer_that_made_the_folder_removes_it_when_it_fails_before_writing(tmp_path: Path) -> None:
    """A writer that created the folder and failed removes it only when it is empty but for its
    lock; one that another process has begun to use stays."""
    folder = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with folder_lock(folder, "prepare", "--data"):
            raise RuntimeError("MNIST is missing")
    assert not folder.exists()
    with pytest.raises(RuntimeError):
        with folder_lock(folder, "prepare", "--data"):
            (folder / "train.parquet").write_bytes(b"written")
            raise RuntimeError("later")
    assert (folder / "train.parquet").exists()


def test_a_held_lock_is_not_taken_through_another_spelling(tmp_path: Path) -> None:
    """Another process holding the folder under its real name refuses us under a link's."""
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    code = (
        "import time\nfrom pathlib import Path\nfrom mnistsum_cli.store.locks import folder_lock\n"
        f"with folder_lock(Path({str(tmp_path / 'data')!r}), 'train', '--artifacts'):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=f"pid {holder.pid}"):
            with folder_lock(tmp_path / "link", "evaluate", "--artifacts"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_compare_names_its_figure_only_by_run_ids_that_can_name_a_file(tmp_path: Path) -> None:
    """A planted history's run id ../../x does not lead `compare`'s figure out of compare/."""
    from mnistsum_cli.training.runlist import RunEntry, compare_path

    entries = [RunEntry(tmp_path, {"run_id": "../../../x"}), RunEntry(tmp_path, {"run_id": "0123456789abcdef"})]
    assert compare_path(tmp_path / "artifacts", entries) == tmp_path / "artifacts" / "compare" / "run-01234567.png"


@pytest.mark.parametrize("planted", ["link", "dangling link"])
def test_compare_never_writes_through_a_linked_compare_folder(
    workdir: Path, outside: Path, run_cli, planted: str
) -> None:
    """<artifacts>/compare planted as a link to a folder elsewhere: the figure is refused in one
    line, not written into the link's target."""
    artifacts = workdir / "artifacts"
    target = outside / "victim" if planted == "link" else outside / "missing"
    (artifacts / "compare").symlink_to(target)
    run_id = json.loads((artifacts / "history.json").read_text())["run_id"]
    before, before_outside = snapshot(artifacts), state_of(outside)
    code, out, err = run_cli("compare", run_id)
    assert code == 1
    line = assert_one_line_error(err, out)
    assert "artifacts/compare is a symbolic link, which mnistsum does not write through; nothing was written" in line
    assert snapshot(artifacts) == before and state_of(outside) == before_outside


@pytest.mark.parametrize("planted", ["tensorboard", "tensorboard/<run id>"])
def test_train_tensorboard_never_writes_events_through_a_planted_link(
    workdir: Path, outside: Path, run_cli, ctrl_c_after_epoch, planted: str
) -> None:
    """<artifacts>/tensorboard a link: refused before training starts. <artifacts>/tensorboard/
    <run id> a link (the id `--resume` continues is in the folder's history): refused before
    the first event, the epoch saved."""
    pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
    artifacts = workdir / "artifacts"
    ctrl_c_after_epoch()
    assert run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 2, "--seed", 5)[0] == 130
    ctrl_c_after_epoch(False)
    run_id = json.loads((artifacts / "history.json").read_text())["run_id"]
    link = artifacts / planted.replace("<run id>", run_id)
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(outside / "victim")
    before, before_outside = snapshot(artifacts), state_of(outside)
    code, out, err = run_cli("train", "--resume", "--cpu", "--tensorboard")
    assert code == 1
    line = assert_one_line_error(err, out)
    assert f"{link.relative_to(workdir)} is a symbolic link, which mnistsum does not write events through" in line
    assert state_of(outside) == before_outside
    epochs = len(json.loads((artifacts / "history.json").read_text())["epochs"])
    if planted == "tensorboard":
        assert snapshot(artifacts) == before and epochs == 1, "refused before training"
    else:
        assert epochs == 2, "the epoch is saved; only its events are refused"


@pytest.mark.parametrize("number", ["1" + "0" * 400, "1" * 5000], ids=["beyond a float", "5000 digits"])
def test_a_number_no_float_holds_is_one_line(workdir: Path, run_cli, number: str) -> None:
    """train_loss 10**400 would pass as a finite number and overflow in float() later; an
    integer of 5000 digits makes Python's JSON reader raise ValueError (not JSONDecodeError)."""
    artifacts = workdir / "artifacts"
    text = (artifacts / "history.json").read_text()
    history = json.loads(text)
    loss = history["epochs"][0]["train_loss"]
    (artifacts / "history.json").write_text(text.replace(json.dumps(loss), number, 1))
    before = snapshot(artifacts)
    code, out, err = run_cli("plot")
    assert code == 1
    line = assert_one_line_error(err, out)
    assert "history.json" in line, line
    assert snapshot(artifacts) == before


@pytest.mark.parametrize(
    "value, message",
    [("nan", "nan is not a finite number"), ("inf", "inf is not a finite number"), ("11", "11.0 is above 10")],
)
def test_a_float_setting_says_which_rule_it_breaks(run_cli, value: str, message: str) -> None:
    """NaN fails every comparison: typer's range check, which runs before the callback, said
    "should be less than or equal to 10" of it."""
    code, out, err = run_cli("train", "--lr", value)
    assert code == 2
    assert f"Invalid value for '--lr': {message} (see `mnistsum train --help`)" in assert_one_line_error(err, out)
