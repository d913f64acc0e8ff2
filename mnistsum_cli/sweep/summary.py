"""What a study says about itself, as text and rows (this module prints nothing): how many trials
finished, a finished trial's line, the best trial(s) and the `mnistsum train` command that trains
one again, and the rows of `sweep --show` (the CLI draws them as a table, JSON or CSV).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.sweep.storage import retried_number
from mnistsum_cli.terminal import percent, value_text

if TYPE_CHECKING:
    import optuna


def finished_states() -> tuple[Any, ...]:
    """What counts towards --trials: completed and pruned trials; failed ones do not."""
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)


def trial_counts(study: optuna.Study) -> Counter:
    return Counter(trial.state for trial in study.get_trials(deepcopy=False))


def finished_count(counts: Counter) -> int:
    return sum(counts[state] for state in finished_states())


def settings_text(params: dict[str, Any], names: list[str]) -> str:
    return ", ".join(f"{name} {value_text(params[name])}" for name in names if name in params)


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


@dataclass
class ShownStudy:
    """`sweep --show`'s answer: a title, one row per trial (show_rows), the searched settings
    among the row's keys, and a line per best trial."""

    title: str
    rows: list[dict[str, Any]]
    names: list[str]
    best: list[str] = field(default_factory=list)

    def as_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(self.rows[0]) if self.rows else ["number"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()
