"""Every command against every fault of every file it reads, and of the folder it writes.

The files are the artifacts that mnistsum_cli/store/schemas.py declares (each names its file and the
stage that writes it, and so its folder: `prepare` writes the data folder, the others the
artifacts folder) and the store's generation files. Which of them a command reads is recorded
by running it once on a good run (an audit hook sees every open), and a file is one it
requires when the command fails without it; so a new artifact, or a new read of one, joins the
matrix by itself. Each case then runs on a fresh copy of the run and must end within seconds,
in bounded memory (the workers run under RLIMIT_DATA), with exit code 0, 1 or 2 (1 or 2 for a
required file and for every output fault), exactly one line on stderr when it fails and no
traceback, the file named in that line, both folders unchanged when it fails, no temporary
file left and nothing outside the folders touched.

The cases run in two worker processes (one per core in CI), each running its commands
in-process one case after another with an alarm per case: the workers' results are shared by
one test per command.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from conftest import VAL_SIZE, FakeMnist, _main
from mnistsum_cli.store.journal import GENERATION
from mnistsum_cli.store.locks import LOCK
from mnistsum_cli.store.paths import SPLITS
from mnistsum_cli.store.schemas import SCHEMAS
from mnistsum_cli.training.runlist import PNG_SIGNATURE

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

REPO = Path(__file__).resolve().parents[1]
CASE_SECONDS = 20  # one case: a refusal takes milliseconds, the slowest good case (train) a few seconds
MEMORY_LIMIT = 3 << 30  # RLIMIT_DATA of a worker: torch and a small training run fit, /dev/zero read whole does not
HUGE_BYTES = 16 << 30  # a sparse file this large: reading it whole would need 16 GiB
LONG_NAME = "x" * 300  # over the 255 bytes a file name may have

# The commands, each run in a folder holding data/ and artifacts/ of a complete run (evaluated,
# plotted), or of the run ROOTS names.
COMMANDS: dict[str, list[str]] = {
    "prepare": ["prepare", "--mnist-dir", "{mnist}", "--val-size", str(VAL_SIZE), "--data", "data"],
    "train": ["train", "--preset", "cpu", "--cpu", "--epochs", "1", "--artifacts", "artifacts"],
    "train --resume": ["train", "--resume", "--cpu"],
    "evaluate": ["evaluate", "--cpu"],
    "plot": ["plot"],
    "predict": ["predict", "--index", "0", "--cpu"],
    "run": ["run", "--cpu", "--mnist-dir", "{mnist}"],
    "status": ["status", "--json"],
    "runs": ["runs", "--json"],
    "compare": ["compare", "artifacts", "--out", "out/compare.png"],
    "serve": ["serve", "--cpu", "--port", "0", "--workers", "1"],  # start-up: uvicorn's loop is stubbed out
}
ROOTS = {"train --resume": "interrupted"}  # the run a command starts from, when not the complete one ("good")
# command -> (its argv when its writes are tested, the folder it writes first, the option that names
# it or None); `run --force` stands for run's writes (an up-to-date `run` writes nothing), and its
# first write is prepare's.
WRITERS: dict[str, tuple[list[str], str, str | None]] = {
    "prepare": (COMMANDS["prepare"], "data", "--data"),
    "train": (COMMANDS["train"], "artifacts", "--artifacts"),
    "train --resume": (COMMANDS["train --resume"], "artifacts", None),
    "evaluate": (COMMANDS["evaluate"], "artifacts", None),
    "plot": (COMMANDS["plot"], "artifacts", None),
    "run": (["run", "--cpu", "--force", "--mnist-dir", "{mnist}", "--data", "data"], "data", "--data"),
    "compare": (COMMANDS["compare"], "out", "--out"),
}
INPUT_FAULTS = (
    "missing",
    "a folder",
    "unreadable",
    "empty",
    "truncated",
    "a FIFO",
    "a link to /dev/zero",
    "a link outside",
    "huge",
)
OUTPUT_FAULTS = ("full", "read-only", "under a file", "name too long")
WORKERS = (
    ("train", "train --resume", "plot", "predict", "serve", "runs"),
    ("run", "evaluate", "prepare", "status", "compare"),
)


# --------------------------------------------------------------------------- the files


def artifact_files() -> list[str]:
    """Every artifact file the schemas declare, relative to the folder holding data/ and
    artifacts/, and the store's generation file of both folders."""
    files = [f"data/{GENERATION}", f"artifacts/{GENERATION}"]
    for schema in SCHEMAS:
        folder = "data" if schema.stage == "prepare" else "artifacts"
        for name in schema.file_description.split(":")[0].split(", "):
            names = [name.replace("<split>", split) for split in SPLITS] if "<split>" in name else [name]
            files += [f"{folder}/{each}" for each in names]
    return files


def state(root: Path) -> dict[str, Any]:
    """What is under `root`, without reading through links, FIFOs or huge files: each entry's
    kind and, for a regular file, its content hash (or size, when huge); lock files aside."""
    found: dict[str, Any] = {}
    for folder, names, files in os.walk(root):
        for name in names + files:
            path = Path(folder) / name
            info = os.lstat(path)
            key = str(path.relative_to(root))
            if name == LOCK:  # its content names the last holder; a command may create it
                continue
            if stat.S_ISLNK(info.st_mode):
                found[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                small = info.st_size < 64 << 20
                found[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest() if small else info.st_size)
            else:
                found[key] = ("other", stat.S_IFMT(info.st_mode))
    return found


# --------------------------------------------------------------------------- the worker


class CaseTimeout(BaseException):
    """The alarm of one case: it ran past CASE_SECONDS (a BaseException: no handler takes it)."""


class StageRan(BaseException):
    """A stage of `run` was about to run: in the input cases of `run` the stages are stubbed out,
    since what they read is the stage commands' own cases; what is tested is run's judging of
    every input, which then runs the stage that remakes it."""


@contextlib.contextmanager
def stages_stubbed() -> Iterator[None]:
    import mnistsum_cli.evaluation.evaluate
    import mnistsum_cli.evaluation.plot
    import mnistsum_cli.pipeline

    def stub(stage: str) -> Callable:
        def ran(*args: Any, **kwargs: Any) -> None:
            raise StageRan(stage)

        return ran

    with contextlib.ExitStack() as stack:
        for module, name in (
            (mnistsum_cli.pipeline, "prepare"),
            (mnistsum_cli.pipeline, "run_training"),
            (mnistsum_cli.evaluation.evaluate, "evaluate_model"),
            (mnistsum_cli.evaluation.plot, "plot"),
        ):
            stack.enter_context(patched(module, name, stub(name)))
        yield


@contextlib.contextmanager
def patched(target: Any, name: str, replacement: Callable) -> Iterator[None]:
    original = getattr(target, name)
    setattr(target, name, replacement)
    try:
        yield
    finally:
        setattr(target, name, original)


def _under(path: Any, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(folder)
    except TypeError:  # a descriptor
        return False


@contextlib.contextmanager
def unreadable(target: Path) -> Iterator[None]:
    """Opening `target` fails with EACCES, as for a file of another user without read permission
    (the tests run as root, which chmod 000 does not stop)."""
    real_os_open, real_open = os.open, builtins.open

    def refuse(path: Any) -> None:
        if _under(path, target):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        refuse(path)
        return real_os_open(path, *args, **kwargs)

    def open_(file: Any, *args: Any, **kwargs: Any) -> Any:
        refuse(file)
        return real_open(file, *args, **kwargs)

    with patched(os, "open", os_open), patched(builtins, "open", open_), patched(io, "open", open_):
        yield


@contextlib.contextmanager
def failing_writes(fault: str, folder: Path) -> Iterator[None]:
    """Every write fails with ENOSPC ("full"), or every open for writing and every mkdir under
    `folder` with EROFS ("read-only")."""
    if fault == "full":

        def write(descriptor: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with patched(os, "write", write):
            yield
        return
    real_open, real_mkdir = os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def os_open(path: Any, flags: int, *args: Any, dir_fd: Optional[int] = None, **kwargs: Any) -> int:
        # a name relative to a folder's descriptor (writes.replace_file writes so) is where that folder is
        where = path if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fsdecode(path))
        if flags & writing and _under(where, folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(where))
        return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if _under(path, folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        real_mkdir(path, *args, **kwargs)

    with patched(os, "open", os_open), patched(os, "mkdir", mkdir):
        yield


def many_rows(content: bytes) -> bytes:
    """A split with the columns and metadata of the split `content` whose footer declares 2**17
    rows: more than any MNIST set can give a split (image_index is uint16)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(pa.BufferReader(content))
    rows = 1 << 17
    table = pa.table(
        {field.name: pa.array(np.zeros(rows, np.uint8), type=field.type) for field in schema}, schema=schema
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def break_input(root: Path, relative: str, fault: str) -> contextlib.AbstractContextManager:
    """Put `fault` in place of the file `relative` under `root`; the context it returns holds
    the faults that last while the command runs (unreadable)."""
    path = root / relative
    content = path.read_bytes()
    if fault == "unreadable":
        return unreadable(path)
    path.unlink()
    if fault == "a folder":
        path.mkdir()
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "truncated":
        path.write_bytes(content[: len(content) // 2])
    elif fault == "a FIFO":
        os.mkfifo(path)
    elif fault == "a link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif fault == "a link outside":
        outside = root / "outside" / path.name
        outside.write_bytes(content)
        path.symlink_to(outside)
    elif fault == "huge":
        if path.suffix == ".parquet":
            path.write_bytes(many_rows(content))
        else:
            path.write_bytes(content)
            os.truncate(path, HUGE_BYTES)
    else:
        assert fault == "missing", fault
    return contextlib.nullcontext()


def run_case(root: Path, argv: list[str], faults: list[contextlib.AbstractContextManager]) -> dict:
    """main(argv) in `root` under `faults`: exit code, stdout, stderr, seconds, and any exception
    that escaped it (a traceback for the user)."""
    from mnistsum_cli.cli.app import main

    stdout, stderr = io.StringIO(), io.StringIO()
    result: dict[str, Any] = {"escaped": None, "stage_ran": None}
    previous = os.getcwd()
    os.chdir(root)
    started = time.monotonic()
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), contextlib.ExitStack() as stack:
            for fault in faults:
                stack.enter_context(fault)
            try:
                main(argv)
            except SystemExit as exit_:
                result["code"] = exit_.code or 0
            else:
                result["code"] = 0
    except StageRan as stage:
        result.update(code=0, stage_ran=str(stage))
    except CaseTimeout:
        result["escaped"] = f"still running after {CASE_SECONDS} s"
    except BaseException as error:
        result["escaped"] = f"{type(error).__name__}: {error}"
    finally:
        signal.alarm(0)
        os.chdir(previous)
    result.update(seconds=round(time.monotonic() - started, 2), out=stdout.getvalue(), err=stderr.getvalue())
    return result


def worker(spec_path: str) -> None:
    """Run every case of the commands in the spec, one JSON line per case into its results file."""
    spec = json.loads(Path(spec_path).read_text())
    roots, scratch, mnist = spec["roots"], Path(spec["scratch"]), spec["mnist"]
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT, MEMORY_LIMIT))

    def timeout(signum: int, frame: Any) -> None:
        raise CaseTimeout

    signal.signal(signal.SIGALRM, timeout)
    import pyarrow.parquet  # noqa: F401 - the heavy imports before the first case's alarm
    import torch
    import torchvision  # noqa: F401
    import uvicorn

    import mnistsum_cli.evaluation.compare
    import mnistsum_cli.evaluation.plot

    torch.set_num_threads(1)
    uvicorn.Server.run = lambda self, sockets=None: None  # serve: start up, load the model, stop
    # plot and compare: every input read and checked, every file written, no figure rendered (seconds each)
    mnistsum_cli.evaluation.plot.draw_all = lambda figures, *args: None
    mnistsum_cli.evaluation.plot.png_bytes = lambda figure, dpi=120: PNG_SIGNATURE
    mnistsum_cli.evaluation.compare.png_bytes = lambda figure, dpi=120: PNG_SIGNATURE
    opened: list[str] = []
    recording = [False]

    def audit(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.abspath(os.fsdecode(args[0])))

    sys.addaudithook(audit)
    candidates = artifact_files()
    with open(spec["results"], "w") as results:

        def case(command: str, target: str, fault: str, argv: list[str]) -> dict:
            """One case on a fresh copy of the good run: `fault` on `target` (a file of it, or the
            folder the command writes), the outcome written to the results."""
            root = scratch / "case"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(roots[ROOTS.get(command, "good")], root, symlinks=True)
            for folder in ("outside", "out"):
                (root / folder).mkdir()
            (root / "blocker").write_text("a file where a folder is asked for\n")
            results.write(json.dumps({"started": [command, target, fault]}) + "\n")
            results.flush()
            faults = []
            if fault in INPUT_FAULTS:
                faults.append(break_input(root, target, fault))
            elif fault in ("full", "read-only"):
                faults.append(failing_writes(fault, root / target))
            if command == "run" and fault not in OUTPUT_FAULTS:
                faults.append(stages_stubbed())
            before = state(root)
            recording[0] = fault == "none"
            opened.clear()
            outcome = run_case(root, [part.replace("{mnist}", mnist) for part in argv], faults)
            recording[0] = False
            after = state(root)
            outcome.update(
                command=command,
                target=target,
                fault=fault,
                changed=sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key)),
                read=sorted({str(Path(path).relative_to(root)) for path in opened if _under(path, root)}),
            )
            results.write(json.dumps(outcome) + "\n")
            results.flush()
            shutil.rmtree(root, ignore_errors=True)
            return outcome

        for command in spec["commands"]:
            baseline = case(command, "", "none", COMMANDS[command])
            for target in [name for name in candidates if name in baseline["read"]]:
                for fault in INPUT_FAULTS:
                    case(command, target, fault, COMMANDS[command])
            if command not in WRITERS:
                continue
            argv, folder, option = WRITERS[command]
            for fault in ("full", "read-only"):
                case(command, folder, fault, argv)
            if option is None:  # the folder holds the command's inputs: it cannot be elsewhere
                continue
            values = {"under a file": f"blocker/{folder}", "name too long": LONG_NAME}
            if option == "--out":
                values = {"under a file": "missing/compare.png", "name too long": f"out/{LONG_NAME}.png"}
            for fault, value in values.items():
                case(
                    command,
                    value,
                    fault,
                    [value if argv[index - 1] == option else part for index, part in enumerate(argv)],
                )


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def roots(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The runs the cases start from: "good", complete (trained, evaluated on test, plotted), and
    "interrupted", stopped by Ctrl-C after epoch 1 of 2 (what `train --resume` continues)."""
    from mnistsum_cli.cli import report

    good, interrupted = tmp_path_factory.mktemp("faults_good"), tmp_path_factory.mktemp("faults_interrupted")
    for name in ("data", "artifacts"):
        shutil.copytree(trained / name, good / name)
    shutil.copytree(trained / "data", interrupted / "data")
    assert _main("plot", "--data", good / "data", "--artifacts", good / "artifacts") == 0

    def end_then_ctrl_c(self: Any, record: Any) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(report.ProgressReporter, "epoch_end", end_then_ctrl_c)
        folders = ("--data", interrupted / "data", "--artifacts", interrupted / "artifacts")
        assert _main("train", "--preset", "cpu", "--cpu", "--epochs", 2, *folders) == 130
    return {"good": good, "interrupted": interrupted}


@pytest.fixture(scope="module")
def matrix(
    roots: dict[str, Path], fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[dict]]:
    """Every case's outcome, by command, from the workers (run side by side)."""
    env = {key: value for key, value in os.environ.items() if key != "MNISTSUM_MNIST_DIR"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1", COLUMNS="200")
    workers = []
    for index, commands in enumerate(WORKERS):
        scratch = tmp_path_factory.mktemp(f"faults_worker{index}")
        spec = {
            "roots": {name: str(root) for name, root in roots.items()},
            "mnist": str(fake_mnist.root),
            "commands": list(commands),
            "scratch": str(scratch),
            "results": str(scratch / "results.jsonl"),
        }
        (scratch / "spec.json").write_text(json.dumps(spec))
        log = open(scratch / "worker.log", "w")
        process = subprocess.Popen(
            [sys.executable, __file__, str(scratch / "spec.json")], env=env, stdout=log, stderr=log
        )
        workers.append((process, scratch, log))
    outcomes: dict[str, list[dict]] = {command: [] for command in COMMANDS}
    for process, scratch, log in workers:
        try:
            process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        lines = [json.loads(line) for line in (scratch / "results.jsonl").read_text().splitlines()]
        for line in lines:
            if "started" not in line:
                outcomes[line["command"]].append(line)
        if process.returncode != 0:
            last = next((line["started"] for line in reversed(lines) if "started" in line), None)
            tail = (scratch / "worker.log").read_text()[-2000:]
            for command in outcomes:
                outcomes[command].append({"worker_died": f"exit {process.returncode} during {last}: {tail}"})
    return outcomes


def problems_of(outcome: dict, required: set[str]) -> list[str]:
    """What is wrong with one case's outcome (nothing, for a good one)."""
    if "worker_died" in outcome:
        return [outcome["worker_died"]]
    if outcome["escaped"]:
        return [f"raised {outcome['escaped']}"]
    problems = []
    code, err = outcome.get("code"), outcome["err"]
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    output = outcome["fault"] in OUTPUT_FAULTS
    if "Traceback" in err or "Traceback" in outcome["out"]:
        problems.append("printed a traceback")
    if code not in (0, 1, 2):
        problems.append(f"exit code {code}")
    elif code == 0 and (output or outcome["target"] in required):
        problems.append("exit code 0: the fault went unnoticed")
    elif code == 0 and any(line.startswith("error:") for line in lines):
        problems.append("exit code 0 after an error line")
    elif code != 0 and (len(lines) != 1 or not lines[0].startswith("error:")):
        problems.append(f"{len(lines)} lines on stderr, not one error line")
    elif code != 0 and Path(outcome["target"]).name not in lines[0]:
        problems.append("the error line does not name the file")
    if code != 0 and outcome["changed"]:
        problems.append(f"failed, yet changed {outcome['changed'][:5]}")
    touched = [key for key in outcome["changed"] if key.startswith("outside") or ".mnistsum-tmp." in key]
    if touched:
        problems.append(f"left or touched {touched[:5]}")
    return problems


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_fault_of_every_file_is_one_line(matrix: dict[str, list[dict]], command: str) -> None:
    outcomes = matrix[command]
    baseline = next((outcome for outcome in outcomes if outcome.get("fault") == "none"), None)
    assert baseline is not None, [outcome["worker_died"] for outcome in outcomes if "worker_died" in outcome]
    assert baseline["code"] == 0 and not baseline["escaped"], baseline
    required = {outcome["target"] for outcome in outcomes if outcome.get("fault") == "missing" and outcome["code"] != 0}
    report = []
    for outcome in outcomes:
        if outcome.get("fault") == "none":
            continue
        for problem in problems_of(outcome, required):
            err = outcome.get("err", "").strip().splitlines()
            report.append(f"{outcome.get('target')} {outcome.get('fault')}: {problem} ({err[-1][:200] if err else ''})")
    assert not report, f"{len(report)} of {len(outcomes) - 1} cases of `{command}`:\n" + "\n".join(report)


def test_every_artifact_is_read_by_some_command(matrix: dict[str, list[dict]], roots: dict[str, Path]) -> None:
    """The matrix is not empty by accident: each file the schemas declare, of those the runs
    hold, is read by some command and so has its cases."""
    held = {name for name in artifact_files() if any((root / name).exists() for root in roots.values())}
    read = {name for outcomes in matrix.values() for outcome in outcomes for name in outcome.get("read", [])}
    assert len(held) >= 11 and held <= read, sorted(held - read)


def test_the_caps_are_far_above_the_largest_real_files() -> None:
    """The model cap holds any architecture's weights many times over (and so the checkpoint's:
    the weights and two AdamW moments)."""
    from safetensors.torch import save

    from mnistsum_cli.store.diskfiles import MAX_CHECKPOINT_BYTES, MAX_MODEL_BYTES
    from mnistsum_cli.training.models import ARCHITECTURES, build_model

    largest = max(len(save(build_model(arch).state_dict())) for arch in ARCHITECTURES)
    assert 10 * largest < MAX_MODEL_BYTES and 10 * 3 * largest < MAX_CHECKPOINT_BYTES, largest


if __name__ == "__main__":
    worker(sys.argv[1])
