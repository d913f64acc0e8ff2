"""Training settings: each declared once in config.TrainConfig, the options of `train` and
`run` derived from it, presets, and completion of the names the options take."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from mnistsum_cli.cli.options import Settings, with_setting_options
from mnistsum_cli.settings import PRESET_NOTES, PRESETS, Setting, TrainConfig, describe_preset, setting_fields

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

REPO = Path(__file__).resolve().parents[1]


def test_every_field_is_a_setting_with_help() -> None:
    declared = setting_fields()
    assert [name for name, _, _ in declared] == [field.name for field in fields(TrainConfig)]
    for name, kind, setting in declared:
        assert kind in (str, int, float, bool), name
        assert setting.help.endswith("."), name


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def other_value(name: str, kind: type, setting: Setting, current: Any) -> Any:
    """A valid value of the setting that differs from `current`."""
    if kind is bool:
        return not current
    if setting.choices:
        return next(choice for choice in setting.choices if choice != current)
    if setting.max is not None:
        return kind(setting.max)
    return kind(current + 1) if kind is int else current * 2 + 0.25


def received_settings(args: list[str], exclude: tuple[str, ...] = ()) -> Settings:
    """The Settings a command decorated with with_setting_options receives for `args`."""
    received: dict[str, Settings] = {}
    app = typer.Typer()

    @app.command()
    @with_setting_options(exclude)
    def command(other: int = 0, *, settings: Settings) -> None:
        received["settings"] = settings

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return received["settings"]


def test_every_setting_becomes_an_option_that_reaches_the_config() -> None:
    defaults = TrainConfig()
    args, expected = [], {}
    for name, kind, setting in setting_fields():
        value = other_value(name, kind, setting, getattr(defaults, name))
        expected[name] = value
        if kind is bool:
            args.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            args += [flag(name), str(value)]
    settings = received_settings(args)
    assert settings == expected
    assert defaults.with_overrides(**settings).to_dict() == expected


def test_settings_left_out_are_none_and_excluded_ones_absent() -> None:
    settings = received_settings([], exclude=("seed",))
    assert "seed" not in settings
    assert set(settings) == {field.name for field in fields(TrainConfig)} - {"seed"}
    assert all(value is None for value in settings.values())
    assert TrainConfig().with_overrides(**settings) == TrainConfig()


@pytest.mark.parametrize(
    "setting, value, refused",
    [
        (Setting("x", above=0), 0.0, True),
        (Setting("x", above=0), 1e-9, False),
        (Setting("x"), math.nan, True),
        (Setting("x"), math.inf, True),
        (Setting("x", min=0, max=1), 1.5, True),
        (Setting("x", min=0, max=1), 1.0, False),
        (Setting("x", choices=("a", "b")), "c", True),
        (Setting("x"), 3, False),
    ],
)
def test_setting_problems(setting: Setting, value: Any, refused: bool) -> None:
    assert (setting.problem(value) is not None) == refused


def test_every_preset_has_a_one_line_description() -> None:
    assert list(PRESET_NOTES) == list(PRESETS)
    for name, config in PRESETS.items():
        description = describe_preset(name)
        assert description.startswith(f"{config.arch}, {config.epochs} epochs") and "\n" not in description


def test_help_texts_state_no_results() -> None:
    """Help texts describe settings; measured times and accuracies live in docs/performance.md."""
    texts = [setting.help for _, _, setting in setting_fields()] + list(PRESET_NOTES.values())
    for text in texts:
        assert "%" not in text and " min" not in text and " s " not in text, text


@pytest.mark.parametrize(
    "words, expected",
    [
        ("mnistsum train --preset ", set(PRESETS)),
        ("mnistsum run --preset c", {"cpu", "cpu-v1", "convnet"}),
        ("mnistsum train --arch fastnet", {"fastnet", "fastnet-small", "fastnet-wide"}),
        ("mnistsum evaluate --split ", {"train", "val", "test"}),
    ],
)
def test_shell_completion_offers_the_names(words: str, expected: set[str]) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "_MNISTSUM_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split(" ")) - 1),
    }
    result = subprocess.run(
        [sys.executable, "-m", "mnistsum_cli"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == expected
