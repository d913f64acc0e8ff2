"""A worker: it runs trials of one study on one device until the study holds enough finished
ones, each trained through training.run into its trial-<n>/ folder with a trial.json record.
Counting trials decides when a worker starts one, waits, or stops.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from mnistsum_cli.store.fingerprints import now_iso
from mnistsum_cli.store.paths import DataDir, RunDir
from mnistsum_cli.sweep.plan import SweepPlan
from mnistsum_cli.sweep.pruning import OBJECTIVE_METRIC
from mnistsum_cli.sweep.storage import open_storage, storage_cause, storage_errors
from mnistsum_cli.sweep.summary import best_text, finished_count, trial_counts, trial_line

if TYPE_CHECKING:
    import optuna

    from mnistsum_cli.data.splitdata import SplitData

POLL_SECONDS = 1.0  # how often a worker with nothing to start looks again


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

        from mnistsum_cli.data.splitdata import SplitData

        self.plan, self.device, self.worker, self.say = plan, torch.device(device), worker, say
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # nothing strays onto GPU 0
        self.notify = notify or (lambda message: None)
        self.prepared: SplitData = SplitData(DataDir(plan.data), plan.mnist_dir)  # read once, for every trial
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
    folder: RunDir, study: str, trial: optuna.Trial, state: str, seconds: Optional[float]
) -> Optional[dict[str, Any]]:
    """trial.json in the trial's folder (a store commit): which study and trial the run is and
    how it ended. None when the trial saved no epoch (nothing to describe)."""
    from mnistsum_cli.store.schemas import HISTORY
    from mnistsum_cli.store.transactions import commit
    from mnistsum_cli.training.run import Run

    saved = Run.saved(folder)
    if saved is None:
        return None
    epochs = HISTORY.read_json(folder.history)["epochs"]
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
    with commit(folder.root, "sweep", "--artifacts") as change:
        change.write_json(folder.trial, record)
    return record
