"""`mnistsum sweep`: search training settings with Optuna, its storage the shared record.

A study lives in an Optuna storage (SQLite in the study folder by default; PostgreSQL or any
database Optuna supports lets processes on many machines join). Each worker process asks the
storage for a trial, trains it through session.run_training into <artifacts>/sweeps/<study>/
trial-<n>/ (so `runs`, `compare`, `evaluate`, `plot` and `serve` read it like any run), and
tells the result back; the storage's unique trial numbers keep two workers out of one folder.
Heartbeats fail the trial of a killed worker, and it is retried once. docs/sweep.md tells how.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from mnistsum_cli.errors import BadOption, Interrupted, MnistsumError, first_line
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.fingerprints import now_iso
from mnistsum_cli.store.paths import SWEEPS, DataDir, RunDir
from mnistsum_cli.sweep.pruning import OBJECTIVE_METRIC
from mnistsum_cli.sweep.space import SearchSpace, parse_space
from mnistsum_cli.terminal import percent

if TYPE_CHECKING:
    import optuna

    from mnistsum_cli.data.prepared import PreparedData

OBJECTIVES = {"accuracy": ("maximize",), "accuracy,time": ("maximize", "minimize")}
DEFAULT_OBJECTIVE = "accuracy"
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
DEFAULT_HEARTBEAT = 10  # seconds between a running trial's heartbeats
GRACE_HEARTBEATS = 3  # a trial silent this many heartbeats long is failed (and retried once)
SQLITE_LOCK_WAIT = 60.0  # seconds SQLite waits for another process's write: heartbeats on a busy machine wait too
TABLE_ATTEMPTS = 3  # tries at making Optuna's tables (see open_storage)
POLL_SECONDS = 1.0  # how often a worker with nothing to start looks again
# What a study records of the sweep that made it (study user attrs); a joining sweep must agree.
STUDY_ATTRS = ("dataset_id", "objective", "space", "base_config")
# A process that makes a study records these one by one right after: another one that finds the
# study meanwhile waits this long for them before it calls the study foreign
ATTRS_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class SweepPlan:
    """Everything a worker process needs (picklable: workers are spawned)."""

    study: str
    storage: str
    trials: int
    objective: str
    pruner: str
    space: SearchSpace
    base: TrainConfig
    data: Path
    artifacts: Path
    mnist_dir: Optional[Path]
    heartbeat: int = DEFAULT_HEARTBEAT
    seed: Optional[int] = None
    timeout: Optional[float] = None  # seconds after which no worker starts another trial

    @property
    def folder(self) -> Path:
        return study_folder(self.artifacts, self.study)

    @property
    def directions(self) -> tuple[str, ...]:
        return OBJECTIVES[self.objective]

    @property
    def prunes(self) -> bool:
        """Optuna cannot prune a trial of several objectives (Trial.report refuses)."""
        return self.pruner != "none" and len(self.directions) == 1


def study_folder(artifacts: Path, study: str) -> Path:
    return artifacts / SWEEPS / study


def check_study_name(name: str) -> str:
    if not STUDY_NAME.fullmatch(name):
        raise BadOption(f"--study {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    return name


def default_storage(artifacts: Path, study: str) -> str:
    return f"sqlite:///{(study_folder(artifacts, study) / 'study.db').resolve()}"


def shown_url(url: str) -> str:
    """The storage URL for messages: its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given, for the message about it
        return url


# --------------------------------------------------------------------------- the storage


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO (a failed one at WARNING, with its traceback) and warns
    that heartbeats are experimental: the sweep prints its own lines."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A storage that cannot be reached, refuses us or is locked: one line naming it."""
    import optuna
    import sqlalchemy.exc

    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        raise MnistsumError(f"storage {shown_url(url)}: {storage_cause(error)}") from None
    except ImportError as error:  # the URL's database driver is not installed
        raise MnistsumError(f"storage {shown_url(url)}: {first_line(error)}") from None


def storage_cause(error: BaseException) -> str:
    """The database's own words under Optuna's and SQLAlchemy's wrappers ('database is locked')."""
    while getattr(error, "orig", None) or error.__cause__:
        error = getattr(error, "orig", None) or error.__cause__
    return first_line(error)


def open_storage(url: str, heartbeat: int = DEFAULT_HEARTBEAT, create: bool = True) -> optuna.storages.RDBStorage:
    """The study's RDBStorage with heartbeats: a trial whose process stops beating is failed by the
    next worker that looks, and retried once. `create`: make Optuna's tables when missing. Two
    processes making the tables of an empty database at once collide (PostgreSQL: a duplicate
    key); the loser tries again and finds them made."""
    import optuna
    import sqlalchemy.exc

    quiet_optuna()
    attempts = 0
    while True:
        try:
            with storage_errors(url):
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"connect_args": {"timeout": SQLITE_LOCK_WAIT}} if url.startswith("sqlite") else {},
                    skip_table_creation=not create,
                    heartbeat_interval=heartbeat,
                    grace_period=GRACE_HEARTBEATS * heartbeat,
                    **_retry_once(),
                )
        except MnistsumError as error:
            attempts += 1
            collided = isinstance(error.__context__, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError))
            if not (create and collided and attempts < TABLE_ATTEMPTS):
                raise
            time.sleep(0.5)
        except (sqlalchemy.exc.ArgumentError, ValueError, optuna.exceptions.OptunaError) as error:
            raise BadOption(f"--storage {shown_url(url)}: {first_line(error)}") from None


def _retry_once() -> dict[str, Any]:
    """RDBStorage's argument that retries a stale trial once: Optuna 4.9 renamed it (the old name
    remains for Optuna < 4.9, which Python 3.9 gets)."""
    from optuna import storages

    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
    return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}


def retried_number(trial: optuna.trial.FrozenTrial) -> Optional[int]:
    """The number of the trial this one retries, or None."""
    from optuna import storages

    retry = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" since Optuna 2.8
        return retry.retried_trial_number(trial)


def find_study(storage: optuna.storages.RDBStorage, plan_or_name: Any, url: str) -> Optional[int]:
    """The study's id in the storage, or None when it holds none of that name."""
    name = plan_or_name if isinstance(plan_or_name, str) else plan_or_name.study
    with storage_errors(url):
        try:
            return storage.get_study_id_from_name(name)
        except KeyError:
            return None


def open_study(plan: SweepPlan, dataset_id: str) -> None:
    """Create the study or check that the one there is this sweep's: same directions, dataset,
    objective, space and base settings. A mismatch is one line, and nothing is written."""
    import optuna

    storage = open_storage(plan.storage, plan.heartbeat)
    wanted = {
        "dataset_id": dataset_id,
        "objective": plan.objective,
        "space": plan.space.to_dict(),
        "base_config": plan.base.to_dict(),
    }
    with storage_errors(plan.storage):
        if find_study(storage, plan, plan.storage) is None:
            study = optuna.create_study(
                storage=storage, study_name=plan.study, directions=list(plan.directions), load_if_exists=True
            )
            for key, value in wanted.items():
                study.set_user_attr(key, value)
        study = optuna.load_study(study_name=plan.study, storage=storage)
        deadline = time.monotonic() + ATTRS_WAIT_SECONDS
        while not all(key in study.user_attrs for key in STUDY_ATTRS) and time.monotonic() < deadline:
            time.sleep(0.2)  # another process made the study a moment ago and is still recording what it is
            study = optuna.load_study(study_name=plan.study, storage=storage)
        check_study(study, plan, wanted)


def check_study(study: optuna.Study, plan: SweepPlan, wanted: dict[str, Any]) -> None:
    directions = [direction.name.lower() for direction in study.directions]
    where = f"study {plan.study!r} in {shown_url(plan.storage)}"
    if directions != list(plan.directions):
        raise MnistsumError(
            f"{where} is made to {' and '.join(directions)} {len(directions)} objective(s); "
            f"--objective {plan.objective} needs {', '.join(plan.directions)}: use another --study"
        )
    attrs = study.user_attrs
    if not all(key in attrs for key in STUDY_ATTRS):
        raise MnistsumError(f"{where} was not made by `mnistsum sweep`: use another --study")
    if attrs["dataset_id"] != wanted["dataset_id"]:
        raise MnistsumError(
            f"{where} searches dataset {attrs['dataset_id']}, but {plan.data} holds dataset {wanted['dataset_id']}: "
            "prepare the same data here (same MNIST, --seed, --val-size, --limit) or use another --study"
        )
    for key, option in (("objective", "--objective"), ("space", "--space"), ("base_config", "--preset")):
        if attrs[key] != wanted[key]:
            raise MnistsumError(f"{where} was started with another {option}: pass the same, or use another --study")


def recorded_plan_parts(url: str, name: str, heartbeat: int = DEFAULT_HEARTBEAT) -> Optional[dict[str, Any]]:
    """What an existing study recorded (objective, space, base settings), for a rerun that does
    not repeat them; None when the storage holds no such study."""
    import optuna

    storage = open_storage(url, heartbeat)
    if find_study(storage, name, url) is None:
        return None
    with storage_errors(url):
        attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
    if not all(key in attrs for key in STUDY_ATTRS):
        return None
    return {
        "objective": attrs["objective"],
        "space": parse_space(attrs["space"], f"the space study {name!r} recorded"),
        "base": TrainConfig.from_dict(attrs["base_config"]),
    }


# --------------------------------------------------------------------------- counting trials


def finished_states() -> tuple[Any, ...]:
    """What counts towards --trials: completed and pruned trials; failed ones do not."""
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)


def trial_counts(study: optuna.Study) -> Counter:
    return Counter(trial.state for trial in study.get_trials(deepcopy=False))


def finished_count(counts: Counter) -> int:
    return sum(counts[state] for state in finished_states())


def next_step(counts: Counter, wanted: int) -> str:
    """'done' when the study holds `wanted` finished trials; 'run' when a trial should start: a
    retry waits (WAITING), or the running ones cannot reach `wanted`; else 'wait' for them (a
    running trial may fail and need a successor). Two workers deciding at once may both start
    one: the overshoot is at most workers - 1."""
    from optuna.trial import TrialState

    finished = finished_count(counts)
    if finished >= wanted:
        return "done"
    if counts[TrialState.WAITING] or finished + counts[TrialState.RUNNING] < wanted:
        return "run"
    return "wait"


# --------------------------------------------------------------------------- a worker


@dataclass
class WorkerStats:
    """One worker's time: all of its loop, and the part spent inside run_training; the rest is
    Optuna's (storage, sampling, heartbeats) and the trial records."""

    trials: int = 0
    loop_seconds: float = 0.0
    training_seconds: float = 0.0


class Worker:
    """Runs trials of one study on one device until the study holds plan.trials finished ones."""

    def __init__(
        self,
        plan: SweepPlan,
        device: str,
        worker: int = 0,
        say: Callable[[str], None] = print,
        notify: Optional[Callable[[str], None]] = None,
    ) -> None:
        import torch

        from mnistsum_cli.data.prepared import PreparedData

        self.plan, self.device, self.worker, self.say = plan, torch.device(device), worker, say
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # nothing strays onto GPU 0
        self.notify = notify or (lambda message: None)
        self.prepared: PreparedData = PreparedData(DataDir(plan.data), plan.mnist_dir)  # read once, for every trial
        self.stats = WorkerStats()
        self.current: Optional[int] = None  # the number of the trial this worker runs now (or ran last)
        self._noticed: set[str] = set()

    def study(self) -> optuna.Study:
        import optuna

        with storage_errors(self.plan.storage):
            study = optuna.load_study(
                study_name=self.plan.study,
                storage=open_storage(self.plan.storage, self.plan.heartbeat),
                pruner=make_pruner(self.plan),
            )
            study.sampler = optuna.samplers.TPESampler(seed=self.sampler_seed(len(study.get_trials(deepcopy=False))))
        return study

    def sampler_seed(self, trials: int) -> Optional[int]:
        """The sampler's seed: from --seed, this job's number and the trials the study holds now,
        so that a rerun does not draw its first trials again (TPE draws its first 10 at random)."""
        if self.plan.seed is None:
            return None
        import numpy as np

        return int(np.random.SeedSequence([self.plan.seed, self.worker, trials]).generate_state(1)[0])

    def run(self) -> WorkerStats:
        import optuna

        study = self.study()
        started = time.perf_counter()
        hook, threading.excepthook = threading.excepthook, self._thread_failed
        try:
            while True:
                with storage_errors(self.plan.storage):
                    step = next_step(trial_counts(study), self.plan.trials)
                if step == "done" or self.timed_out(started):
                    break
                if step == "wait":  # (optimize fails stale trials itself before each trial)
                    time.sleep(POLL_SECONDS)
                    with storage_errors(self.plan.storage):
                        optuna.storages.fail_stale_trials(study)
                    continue
                try:
                    with storage_errors(self.plan.storage):
                        study.optimize(self.objective, n_trials=1, callbacks=[self.progress])
                except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                    if not self.lost_trial(study):
                        raise
                self.stats.trials += 1
        finally:
            threading.excepthook = hook
            self.stats.loop_seconds = time.perf_counter() - started
        return self.stats

    def _thread_failed(self, failure: Any) -> None:
        """Optuna's heartbeat thread stops at its first storage error: one line, not a traceback
        (the trial goes on; if its heartbeats stay away, another worker fails and retries it)."""
        self.notify(f"trial {self.current}: a heartbeat could not be written ({storage_cause(failure.exc_value)})")

    def lost_trial(self, study: optuna.Study) -> bool:
        """Whether another worker failed this worker's trial (its heartbeats did not reach the
        storage for a grace period, say on a busy machine); that trial is retried, so this
        worker goes on with the next. Optuna then refuses the late report or result."""
        from optuna.trial import TrialState

        if self.current is None:
            return False
        with storage_errors(self.plan.storage):
            state = study.get_trials(deepcopy=False)[self.current].state
        if state != TrialState.FAIL:
            return False
        self.notify(f"trial {self.current} was failed by another worker: its heartbeats stopped; it is retried")
        return True

    def timed_out(self, started: float) -> bool:
        return self.plan.timeout is not None and time.perf_counter() - started >= self.plan.timeout

    def _notice_once(self, message: str) -> None:
        if message not in self._noticed:
            self._noticed.add(message)
            self.notify(message)

    def objective(self, trial: optuna.Trial) -> Any:
        """Train the trial's settings into its folder; its value is the kept epoch's val sum accuracy
        (and, with --objective accuracy,time, its training seconds)."""
        import optuna

        from mnistsum_cli.sweep.pruning import PruningReporter
        from mnistsum_cli.training.loop import SilentReporter
        from mnistsum_cli.training.session import continue_command, run_training

        self.current = trial.number
        config = self.plan.space.config(self.plan.base, trial)
        run = RunDir(self.plan.folder / f"trial-{trial.number}")
        trial.set_user_attr("folder", str(run.root))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        reporter = PruningReporter(trial) if self.plan.prunes else SilentReporter()
        state, seconds = "failed", None
        started = time.perf_counter()
        try:
            trained = run_training(
                config,
                self.prepared,
                run,
                self.device,
                resume=False,
                continue_with=continue_command("train --resume", run),
                notify=self._notice_once,
                reporter=reporter,
            )
            state, seconds = "complete", trained.train_seconds
        except optuna.TrialPruned:
            state = "pruned"
            raise
        finally:
            self.stats.training_seconds += time.perf_counter() - started
            record = write_trial_record(run, self.plan.study, trial, state, seconds)
            if record is not None:
                trial.set_user_attr("epochs_done", record["epochs_done"])
        value = record["value"]
        trial.set_user_attr("seconds", seconds)
        return (value, seconds) if len(self.plan.directions) == 2 else value

    def progress(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """One line per finished trial: number, state, value, epochs, the settings drawn; the best so far."""
        self.say(trial_line(trial, self.plan.space.names) + "  |  " + best_text(study))


def make_pruner(plan: SweepPlan) -> optuna.pruners.BasePruner:
    import optuna

    if not plan.prunes:
        return optuna.pruners.NopPruner()
    if plan.pruner == "hyperband":
        epochs = [plan.base.with_overrides(**plan.space.fixed).epochs]
        for dimension in plan.space.dimensions:
            if dimension.name == "epochs":
                epochs.append(int(max(dimension.choices or (dimension.high,))))
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs))
    return optuna.pruners.MedianPruner()


def write_trial_record(
    run: RunDir, study: str, trial: optuna.Trial, state: str, seconds: Optional[float]
) -> Optional[dict[str, Any]]:
    """trial.json in the trial's folder (a store commit): which study and trial the run is and
    how it ended. None when the trial saved no epoch (nothing to describe)."""
    from mnistsum_cli.store.schemas import HISTORY
    from mnistsum_cli.store.transactions import commit
    from mnistsum_cli.training.run import Run

    saved = Run.saved(run)
    if saved is None:
        return None
    epochs = HISTORY.read_json(run.history)["epochs"]
    if state == "pruned":
        value = epochs[-1][OBJECTIVE_METRIC]  # what Optuna keeps: the last value reported
    else:
        value = epochs[saved.best_epoch - 1][OBJECTIVE_METRIC] if state == "complete" else None
    record = {
        "study": study,
        "number": trial.number,
        "state": state,
        "value": value,
        "seconds": seconds,
        "epochs_done": saved.epoch,
        "run_id": saved.run_id,
        "params": dict(trial.params),
        "updated_at": now_iso(),
    }
    with commit(run.root, "sweep", "--artifacts") as change:
        change.write_json(run.trial, record)
    return record


# --------------------------------------------------------------------------- lines and tables


def settings_text(params: dict[str, Any], names: list[str]) -> str:
    return ", ".join(f"{name} {value_text(params[name])}" for name in names if name in params)


def value_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def values_text(trial: optuna.trial.FrozenTrial) -> str:
    if trial.values is None:
        return "no value"
    if len(trial.values) == 2:
        return f"val {percent(trial.values[0])}, {trial.values[1]:.1f} s"
    return f"val {percent(trial.values[0])}"


def trial_line(trial: optuna.trial.FrozenTrial, names: list[str]) -> str:
    epochs = trial.user_attrs.get("epochs_done", "?")
    state = trial.state.name.lower()
    return (
        f"trial {trial.number}  {state:8}  {values_text(trial)}  {epochs} epochs  {settings_text(trial.params, names)}"
    )


def best_text(study: optuna.Study) -> str:
    if len(study.directions) == 2:
        return f"Pareto front: {len(study.best_trials)} trial(s)"
    try:
        best = study.best_trial
    except ValueError:
        return "no complete trial yet"
    return f"best: trial {best.number}, val {percent(best.value)}"


def show_rows(study: optuna.Study, names: list[str]) -> list[dict[str, Any]]:
    """One row per trial, for `sweep --show` (table, --json, --csv)."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        values = trial.values or []
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name.lower(),
                "val_sum_accuracy": values[0] if values else None,
                "seconds": values[1] if len(values) == 2 else trial.user_attrs.get("seconds"),
                "epochs_done": trial.user_attrs.get("epochs_done"),
                **{name: trial.params.get(name) for name in names},
                "retry_of": retried_number(trial),
                "folder": trial.user_attrs.get("folder"),
            }
        )
    return rows


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best trial, or the Pareto front with two objectives (empty when nothing completed)."""
    try:
        return list(study.best_trials) if len(study.directions) == 2 else [study.best_trial]
    except ValueError:
        return []


def train_command(plan_base: TrainConfig, trial: optuna.trial.FrozenTrial, fixed: dict[str, Any], data: Path) -> str:
    """The `mnistsum train` command that trains the trial's settings again."""
    from mnistsum_cli.settings import preset_matching

    config = plan_base.with_overrides(**fixed, **trial.params)
    name = preset_matching(plan_base) or "default"
    base = plan_base if preset_matching(plan_base) else TrainConfig()
    flags = [f"--preset {name}"]
    for key, value in config.to_dict().items():
        if value == base.to_dict()[key]:
            continue
        flag = "--" + key.replace("_", "-")
        flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value!r}")
    folder = "" if data == Path("data") else f" --data {data}"
    return "mnistsum train " + " ".join(flags).replace("'", "") + folder


# --------------------------------------------------------------------------- running a sweep


def run_sweep(
    plan: SweepPlan,
    devices: list[str],
    threads: Optional[int],
    say: Callable[[str], None],
    notify: Callable[[str], None],
) -> None:
    """Run the workers, one per entry of `devices` (in this process when there is one; spawned
    processes otherwise, each with `threads` torch threads), until the study holds plan.trials
    finished trials. Ctrl-C: finished trials stay; the running ones are marked failed."""
    try:
        if len(devices) == 1:
            Worker(plan, devices[0], 0, say, notify).run()
        else:
            _run_processes(plan, devices, threads, notify)
    except (KeyboardInterrupt, Interrupted):
        raise Interrupted(interrupted_message(plan)) from None


def interrupted_message(plan: SweepPlan) -> str:
    import optuna

    try:
        study = optuna.load_study(study_name=plan.study, storage=open_storage(plan.storage, plan.heartbeat))
        finished = finished_count(trial_counts(study))
    except MnistsumError:
        finished = "?"
    return (
        f"interrupted: the study holds {finished} of {plan.trials} finished trials; the running ones are marked "
        "failed (their finished epochs stay in their folders); rerun the same command to continue"
    )


def _run_processes(plan: SweepPlan, devices: list[str], threads: Optional[int], notify: Callable[[str], None]) -> None:
    context = multiprocessing.get_context("spawn")  # no forked torch or database connections
    workers = [
        context.Process(target=worker_process, args=(plan, index, device, threads), daemon=False)
        for index, device in enumerate(devices)
    ]
    for process in workers:
        process.start()
    try:
        for process in workers:
            process.join()
    except KeyboardInterrupt:
        for process in workers:  # a terminal's Ctrl-C reached them too; a signal to us alone did not
            process.join(timeout=2)
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in workers:
            process.join()
        raise
    codes = [process.exitcode for process in workers]
    if any(code == Interrupted.exit_code for code in codes):
        raise Interrupted(interrupted_message(plan))
    failed = [(index, code) for index, code in enumerate(codes) if code not in (0, None)]
    killed = [f"worker {index} ({_exit_text(code)})" for index, code in failed if code < 0]
    if any(code > 0 for _, code in failed):
        raise MnistsumError(f"{len([c for _, c in failed if c > 0])} worker(s) stopped with an error (see above)")
    if killed:
        notify(f"{', '.join(killed)} died; heartbeats failed its trial and another worker retried it")


def _exit_text(code: int) -> str:
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def worker_process(plan: SweepPlan, index: int, device_name: str, threads: Optional[int]) -> None:
    """A spawned worker: `threads` torch threads, one device, its errors as one line."""
    import sys

    import torch

    from mnistsum_cli import terminal
    from mnistsum_cli.cli import report

    if threads:
        torch.set_num_threads(threads)
    try:
        Worker(plan, device_name, index, say=report.line, notify=terminal.notice).run()
    except (KeyboardInterrupt, Interrupted):
        sys.exit(Interrupted.exit_code)
    except MnistsumError as error:
        terminal.error(f"worker {index}: {error}")
        sys.exit(error.exit_code)


# --------------------------------------------------------------------------- after a sweep


def load_study(url: str, name: str, heartbeat: int = DEFAULT_HEARTBEAT) -> optuna.Study:
    """An existing study, read only (no tables made): one line when there is none."""
    import optuna

    storage = open_storage(url, heartbeat, create=False)
    if find_study(storage, name, url) is None:
        raise MnistsumError(f"no study {name!r} in {shown_url(url)}: run `mnistsum sweep --study {name}` first")
    with storage_errors(url):
        return optuna.load_study(study_name=name, storage=storage)


def check_data(prepared: PreparedData) -> str:
    """The dataset id of the prepared data, read from the split headers (no MNIST, no torch)."""
    return prepared.header.dataset_id


def plan_devices(gpus: Optional[str], jobs: Optional[int], cpu: bool) -> tuple[list[str], Optional[int]]:
    """The device of each worker, and torch threads per worker on the CPU (the cores divided
    among the jobs; None: one job keeps torch's own default). --gpus: one job per GPU listed."""
    if gpus is not None:
        if cpu:
            raise BadOption("--gpus and --cpu exclude each other: pass one")
        try:
            numbers = [int(part) for part in gpus.split(",")]
        except ValueError:
            raise BadOption(f"--gpus {gpus!r}: give GPU numbers separated by commas, e.g. 0,1") from None
        if len(set(numbers)) != len(numbers) or min(numbers) < 0:
            raise BadOption(f"--gpus {gpus!r}: each GPU once, numbers from 0")
        if jobs is not None and jobs != len(numbers):
            raise BadOption(f"--jobs {jobs} with --gpus {gpus}: one job runs per GPU listed; drop --jobs")
        from mnistsum_cli.training.devices import select_device

        for number in numbers:
            select_device(number, False)  # refuses a GPU this machine lacks
        return [f"cuda:{number}" for number in numbers], None
    jobs = jobs or 1
    from mnistsum_cli.training.devices import select_device

    device, _ = select_device(None, cpu)
    if device.type == "cuda":
        return [str(device)] * jobs, None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ["cpu"] * jobs, (max(1, cores // jobs) if jobs > 1 else None)


# --------------------------------------------------------------------------- the command


def check_installed() -> None:
    """`sweep` needs the sweep extra: say so in one line when Optuna is missing."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise MnistsumError("`mnistsum sweep` needs Optuna: pip install 'mnistsum[sweep]'")


def make_plan(
    *,
    study: str,
    trials: int,
    storage: Optional[str],
    space: Optional[Path],
    preset_name: Optional[str],
    objective: Optional[str],
    pruner: str,
    timeout: Optional[float],
    seed: Optional[int],
    heartbeat: int,
    data: Path,
    artifacts: Path,
    mnist_dir: Optional[Path],
    device_type: Callable[[], str],
) -> SweepPlan:
    """The sweep the options ask for. Left out, --space, --preset and --objective take what the
    study recorded when it exists (a rerun continues it), else the device's defaults."""
    from mnistsum_cli.settings import preset, preset_for_device
    from mnistsum_cli.sweep.space import default_space, read_space

    check_study_name(study)
    chosen_space = read_space(space) if space is not None else None
    url = storage or default_storage(artifacts, study)
    recorded = (
        recorded_plan_parts(url, study, heartbeat) if storage or Path(url[len("sqlite:///") :]).exists() else None
    )
    if recorded is not None:
        base = preset(preset_name) if preset_name else recorded["base"]
        chosen_space = chosen_space or recorded["space"]
        objective = objective or recorded["objective"]
    else:
        base = preset(preset_name or preset_for_device(device_type()))
        chosen_space = chosen_space or default_space(device_type())
        objective = objective or DEFAULT_OBJECTIVE
    return SweepPlan(
        study=study,
        storage=url,
        trials=trials,
        objective=objective,
        pruner=pruner,
        space=chosen_space,
        base=base,
        data=data,
        artifacts=artifacts,
        mnist_dir=mnist_dir,
        heartbeat=heartbeat,
        seed=seed,
        timeout=timeout,
    )


def start_sweep(
    *,
    jobs: Optional[int],
    gpus: Optional[str],
    cpu: bool,
    **options: Any,
) -> None:
    """`mnistsum sweep`: check everything, run the workers, print the best trial's train
    command, draw the plots."""
    from mnistsum_cli import terminal
    from mnistsum_cli.cli import report
    from mnistsum_cli.data.prepared import PreparedData

    devices, threads = plan_devices(gpus, jobs, cpu)
    plan = make_plan(**options, device_type=lambda: devices[0].split(":")[0])
    dataset_id = check_data(PreparedData(DataDir(plan.data), plan.mnist_dir))
    if options["storage"] is None:
        plan.folder.mkdir(parents=True, exist_ok=True)  # the default SQLite file's folder
    open_study(plan, dataset_id)
    if plan.pruner != "none" and not plan.prunes:
        terminal.notice("Optuna cannot prune trials of two objectives: pruning is off for --objective accuracy,time")
    terminal.notice(
        f"study {plan.study!r} in {shown_url(plan.storage)}: {len(devices)} job(s) on {', '.join(sorted(set(devices)))}"
        + (f", {threads} thread(s) each" if threads else "")
        + f"; searching {', '.join(plan.space.names)}"
    )
    run_sweep(plan, devices, threads, report.line, terminal.notice)
    summarise(plan)


def summarise(plan: SweepPlan) -> None:
    """The study's state, the best trial's train command, and the plots."""
    from mnistsum_cli.cli import report
    from mnistsum_cli.sweep.plots import draw_study

    study = load_study(plan.storage, plan.study, plan.heartbeat)
    counts = trial_counts(study)
    finished = finished_count(counts)
    states = ", ".join(f"{count} {state.name.lower()}" for state, count in sorted(counts.items(), key=str))
    report.line(f"study {plan.study!r}: {finished} of {plan.trials} finished trials ({states})")
    for trial in best_trials(study):
        report.line(f"best: trial {trial.number}, {values_text(trial)}, in {trial.user_attrs.get('folder')}")
        report.line("  train it again: " + train_command(plan.base, trial, plan.space.fixed, plan.data))
    report.written(draw_study(study, plan.folder))


def show_study(study_name: str, storage: Optional[str], artifacts: Path, as_json: bool, as_csv: bool) -> None:
    """`sweep --show`: the study's trials as a table, JSON or CSV; nothing runs or is written."""
    import csv
    import io

    import typer

    from mnistsum_cli import terminal
    from mnistsum_cli.cli import report

    check_study_name(study_name)
    url = storage or default_storage(artifacts, study_name)
    if storage is None and not Path(url[len("sqlite:///") :]).exists():
        raise MnistsumError(
            f"no study {study_name!r} in {study_folder(artifacts, study_name)}: run `mnistsum sweep` first"
        )
    study = load_study(url, study_name)
    trials = study.get_trials(deepcopy=False)
    names = [name for name in study.user_attrs.get("space", {}) if any(name in trial.params for trial in trials)]
    rows = show_rows(study, names)
    if as_json:
        terminal.print_json(rows)
    elif as_csv:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["number"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(out.getvalue(), nl=False)
    else:
        report.sweep_table(f"study {study_name} in {shown_url(url)}", rows, names)
        for trial in best_trials(study):
            report.line(f"best: trial {trial.number}, {values_text(trial)}")
