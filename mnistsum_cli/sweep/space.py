"""What `mnistsum sweep` searches: training settings (TrainConfig fields) with a range, a log
scale or a list of choices, the rest taken from a preset. Read from a TOML file or the default
for the device, and checked against the settings' own bounds (config.Setting.problem, the rule
`train` applies) before any trial starts, so a space cannot ask for a run `train` refuses.

A space file holds one table per setting searched, and plain values for settings fixed:

    epochs = 3                                  # fixed for every trial
    [lr]
    low = 1e-3
    high = 3e-2
    log = true
    [batch_size]
    choices = [64, 128, 256]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from mnistsum_cli.errors import BadOption
from mnistsum_cli.settings import Setting, TrainConfig, setting_fields

if TYPE_CHECKING:  # optuna loads only when a sweep runs
    import optuna

KEYS = {"low", "high", "log", "step", "choices"}


@dataclass(frozen=True)
class Dimension:
    """One setting searched: a range [low, high] (log scale or steps optional) or choices."""

    name: str
    kind: type  # int, float, bool or str: the TrainConfig field's type
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[tuple[Any, ...]] = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        shown = {"low": self.low, "high": self.high, "log": self.log}
        return {**shown, "step": self.step} if self.step is not None else shown


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions searched and the settings fixed for every trial."""

    dimensions: tuple[Dimension, ...]
    fixed: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [dimension.name for dimension in self.dimensions]

    def config(self, base: TrainConfig, trial: optuna.Trial) -> TrainConfig:
        """The trial's settings: the base preset, the fixed settings, then one value per dimension."""
        return base.with_overrides(**self.fixed, **{d.name: d.suggest(trial) for d in self.dimensions})

    def to_dict(self) -> dict[str, Any]:
        """The space as a space file would say it (what a study records, and compares on rejoin)."""
        return {**self.fixed, **{d.name: d.to_dict() for d in self.dimensions}}


# The default spaces around the presets the device would train with (config.preset_for_device);
# docs/sweep.md explains the choice. Each goes through the same checks as a file.
DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    "cpu": {
        "lr": {"low": 2e-3, "high": 3e-2, "log": True},
        "batch_size": {"choices": [64, 128, 256]},
        "weight_decay": {"low": 1e-5, "high": 1e-2, "log": True},
        "warmup": {"low": 0.0, "high": 0.4},
        "label_smoothing": {"low": 0.0, "high": 0.15},
        "max_shift": {"low": 0, "high": 2},
    },
    "cuda": {
        "lr": {"low": 1e-3, "high": 2e-2, "log": True},
        "batch_size": {"choices": [256, 512, 1024, 2048]},
        "weight_decay": {"low": 1e-5, "high": 1e-2, "log": True},
        "warmup": {"low": 0.0, "high": 0.4},
        "label_smoothing": {"low": 0.0, "high": 0.15},
        "max_shift": {"low": 0, "high": 3},
        "max_rotation": {"low": 0.0, "high": 15.0},
    },
}


def default_space(device_type: str) -> SearchSpace:
    return parse_space(DEFAULT_SPACES["cuda" if device_type == "cuda" else "cpu"], "the default space")


def read_space(path: Path) -> SearchSpace:
    """The space in a TOML file; any problem is one line naming the file and the setting."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.9 and 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise BadOption(f"--space {path}: cannot read it: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise BadOption(f"--space {path}: not TOML: {error}") from None
    return parse_space(data, str(path))


def parse_space(data: dict[str, Any], where: str) -> SearchSpace:
    """A SearchSpace from a parsed space file (or a recorded one); refuses names that are not
    settings and values `train` would refuse."""
    settings = {name: (kind, setting) for name, kind, setting in setting_fields()}
    dimensions, fixed = [], {}
    for name, entry in data.items():
        if name not in settings:
            raise BadOption(f"{where}: {name!r} is not a training setting; choose from {', '.join(settings)}")
        kind, setting = settings[name]
        if isinstance(entry, dict):
            dimensions.append(_dimension(name, kind, setting, entry, f"{where}: {name}"))
        else:
            fixed[name] = _value(kind, setting, entry, f"{where}: {name}")
    if not dimensions:
        raise BadOption(f"{where}: no setting to search: give at least one a range or choices (a [name] table)")
    return SearchSpace(tuple(dimensions), fixed)


def _dimension(name: str, kind: type, setting: Setting, entry: dict[str, Any], where: str) -> Dimension:
    unknown = sorted(set(entry) - KEYS)
    if unknown:
        raise BadOption(f"{where}: unknown key {unknown[0]!r}; a setting takes low and high (log, step) or choices")
    if "choices" in entry:
        if set(entry) != {"choices"}:
            raise BadOption(f"{where}: choices exclude low, high, log and step")
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise BadOption(f"{where}: choices must be a non-empty list")
        values = tuple(_value(kind, setting, choice, where) for choice in choices)
        if len(set(values)) != len(values):
            raise BadOption(f"{where}: choices repeat a value")
        return Dimension(name, kind, choices=values)
    if kind not in (int, float):
        raise BadOption(f"{where}: a {kind.__name__} setting takes choices, not a range")
    if "low" not in entry or "high" not in entry:
        raise BadOption(f"{where}: give low and high (or choices)")
    low, high = (_value(kind, setting, entry[key], f"{where}: {key}") for key in ("low", "high"))
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise BadOption(f"{where}: log must be true or false")
    if low >= high:
        raise BadOption(f"{where}: low {low} must be below high {high}")
    if log and low <= 0:
        raise BadOption(f"{where}: a log scale needs low above 0 (low is {low})")
    step = entry.get("step")
    if step is not None:
        step = _value(kind, Setting(""), step, f"{where}: step")
        if step <= 0 or log:
            raise BadOption(f"{where}: step must be above 0, and excludes log")
    return Dimension(name, kind, low=low, high=high, log=log, step=step)


def _value(kind: type, setting: Setting, value: Any, where: str) -> Any:
    """`value` as the setting's type, if `train` accepts it there (Setting.problem: its bounds)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise BadOption(f"{where}: {value!r} is not {_kind_text(kind)}")
    problem = setting.problem(value)
    if problem is not None:
        raise BadOption(f"{where}: {problem}")
    return value


def _kind_text(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
