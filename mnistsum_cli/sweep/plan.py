"""What a sweep is: its plan (study, storage, objective, space, base settings; picklable for the
spawned workers), the devices its workers run on, and the study in the storage made or checked to
be this sweep's. A rerun that leaves out --space, --preset or --objective takes what the study
recorded.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.paths import SWEEPS
from mnistsum_cli.sweep.space import SearchSpace, parse_space
from mnistsum_cli.sweep.storage import DEFAULT_HEARTBEAT, find_study, open_storage, shown_url, storage_errors

if TYPE_CHECKING:
    import optuna

OBJECTIVES = {"accuracy": ("maximize",), "accuracy,time": ("maximize", "minimize")}
DEFAULT_OBJECTIVE = "accuracy"
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
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
        if find_study(storage, plan.study, plan.storage) is None:
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
