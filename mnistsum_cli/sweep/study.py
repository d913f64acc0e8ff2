"""`mnistsum sweep`: search training settings with Optuna, its storage the shared record.

A study lives in an Optuna storage (SQLite in the study folder by default; PostgreSQL or any
database Optuna supports lets processes on many machines join). Each worker process asks the
storage for a trial, trains it through training.run into <artifacts>/sweeps/<study>/
trial-<n>/ (so `runs`, `compare`, `evaluate`, `plot` and `serve` read it like any run), and
tells the result back; the storage's unique trial numbers keep two workers out of one folder.
Heartbeats fail the trial of a killed worker, and it is retried once. docs/sweep.md tells how.

This module runs the command: the plan (sweep.plan), the workers (sweep.worker, in spawned
processes for several jobs), then the summary and plots; and `sweep --show`'s rows
(sweep.summary). Its lines go through mnistsum_cli.terminal; the CLI draws the tables.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any, Callable, Optional

from mnistsum_cli import terminal
from mnistsum_cli.errors import Interrupted, MnistsumError
from mnistsum_cli.store.paths import DataDir
from mnistsum_cli.sweep.plan import (
    SweepPlan,
    check_study_name,
    default_storage,
    make_plan,
    open_study,
    plan_devices,
    study_folder,
)
from mnistsum_cli.sweep.storage import load_study, open_storage, shown_url
from mnistsum_cli.sweep.summary import (
    ShownStudy,
    best_trials,
    finished_count,
    show_rows,
    train_command,
    trial_counts,
    values_text,
)
from mnistsum_cli.sweep.worker import Worker


def check_installed() -> None:
    """`sweep` needs the sweep extra: say so in one line when Optuna is missing."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise MnistsumError("`mnistsum sweep` needs Optuna: pip install 'mnistsum[sweep]'")


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

    if threads:
        torch.set_num_threads(threads)
    try:
        Worker(plan, device_name, index, say=terminal.line, notify=terminal.notice).run()
    except (KeyboardInterrupt, Interrupted):
        sys.exit(Interrupted.exit_code)
    except MnistsumError as error:
        terminal.error(f"worker {index}: {error}")
        sys.exit(error.exit_code)


def start_sweep(
    *,
    jobs: Optional[int],
    gpus: Optional[str],
    cpu: bool,
    **options: Any,
) -> list[Path]:
    """`mnistsum sweep`: check everything, run the workers, print the best trial's train
    command, draw the plots; the plots' files are returned for the CLI to name."""
    from mnistsum_cli.data.splitdata import SplitData

    devices, threads = plan_devices(gpus, jobs, cpu)
    plan = make_plan(**options, device_type=lambda: devices[0].split(":")[0])
    dataset_id = SplitData(DataDir(plan.data), plan.mnist_dir).header.dataset_id  # the split headers: no torch
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
    run_sweep(plan, devices, threads, terminal.line, terminal.notice)
    return summarise(plan)


def summarise(plan: SweepPlan) -> list[Path]:
    """Print the study's state and the best trial's train command; draw the plots (their files returned)."""
    from mnistsum_cli.sweep.plots import draw_study

    study = load_study(plan.storage, plan.study, plan.heartbeat)
    counts = trial_counts(study)
    finished = finished_count(counts)
    states = ", ".join(f"{count} {state.name.lower()}" for state, count in sorted(counts.items(), key=str))
    terminal.line(f"study {plan.study!r}: {finished} of {plan.trials} finished trials ({states})")
    for trial in best_trials(study):
        terminal.line(f"best: trial {trial.number}, {values_text(trial)}, in {trial.user_attrs.get('folder')}")
        terminal.line("  train it again: " + train_command(plan.base, trial, plan.space.fixed, plan.data))
    return draw_study(study, plan.folder)


def show_study(study_name: str, storage: Optional[str], artifacts: Path) -> ShownStudy:
    """`sweep --show`: the study's trials, for the CLI to print as a table, JSON or CSV; nothing
    runs or is written."""
    check_study_name(study_name)
    url = storage or default_storage(artifacts, study_name)
    if storage is None and not Path(url[len("sqlite:///") :]).exists():
        raise MnistsumError(
            f"no study {study_name!r} in {study_folder(artifacts, study_name)}: run `mnistsum sweep` first"
        )
    study = load_study(url, study_name)
    trials = study.get_trials(deepcopy=False)
    names = [name for name in study.user_attrs.get("space", {}) if any(name in trial.params for trial in trials)]
    return ShownStudy(
        title=f"study {study_name} in {shown_url(url)}",
        rows=show_rows(study, names),
        names=names,
        best=[f"best: trial {trial.number}, {values_text(trial)}" for trial in best_trials(study)],
    )
