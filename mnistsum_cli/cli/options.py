"""The command-line options the commands share, and the training-setting options, one per
TrainConfig field, that `train` and `run` take."""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer

from mnistsum_cli.data.mnist import MNIST_DIR_ENV
from mnistsum_cli.data.prepare import DEFAULT_VAL_SIZE
from mnistsum_cli.settings import MAX_SEED, PRESETS, Setting, describe_preset, setting_fields
from mnistsum_cli.store.paths import SPLITS

# the help panels the options are grouped in
PATHS_PANEL, DEVICE_PANEL, SETTINGS_PANEL = "Paths", "Device", "Training settings (override the preset)"

DataOption = Annotated[
    Path, typer.Option("--data", help="Folder of the Parquet splits (prepare writes it).", rich_help_panel=PATHS_PANEL)
]
ArtifactsOption = Annotated[
    Path,
    typer.Option(
        "--artifacts",
        help="Folder of weights, history, evaluations and plots (train writes it).",
        rich_help_panel=PATHS_PANEL,
    ),
]
MnistDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--mnist-dir",
        envvar=MNIST_DIR_ENV,
        help="Existing MNIST folder (holding MNIST/raw/*-ubyte); nothing is downloaded. "
        "Without it, prepare downloads into data/ and later stages use the folder prepare read.",
        show_default=False,
        rich_help_panel=PATHS_PANEL,
    ),
]
GpuOption = Annotated[
    Optional[int],
    typer.Option("--gpu", min=0, help="Run on CUDA device N.", show_default=False, rich_help_panel=DEVICE_PANEL),
]
CpuOption = Annotated[
    bool, typer.Option("--cpu", help="Run on the CPU even when a GPU exists.", rich_help_panel=DEVICE_PANEL)
]
RUNTIMES = ("torch", "onnx")  # --runtime: model.safetensors on torch, or model.onnx on onnxruntime (onnx_runtime.py)
RuntimeOption = Annotated[
    Literal[RUNTIMES],
    typer.Option(
        "--runtime",
        help="torch: model.safetensors; onnx: model.onnx (`mnistsum export`) on onnxruntime, on the CPU, without torch.",
        rich_help_panel=DEVICE_PANEL,
    ),
]


def split_option(what: str) -> Any:
    """--split, with `what` it does in this command: one help text would fit no two commands."""
    return Annotated[Literal[SPLITS], typer.Option("--split", help=what)]


ValSizeOption = Annotated[int, typer.Option(min=1, help="MNIST train images held out for validation.")]
LimitOption = Annotated[
    Optional[int], typer.Option(min=1, help="Keep at most N rows per split (quick runs).", show_default=False)
]
PresetOption = Annotated[
    Optional[Literal[tuple(PRESETS)]],
    typer.Option(
        "--preset",
        help="Named settings; without it: default on a GPU, cpu on the CPU.\n\n\b\n"  # \b: keep the line breaks
        + "\n".join(f"[bold]{name}[/]: {describe_preset(name)}" for name in PRESETS),
        show_default=False,
    ),
]
RunSeedOption = Annotated[
    Optional[int],
    typer.Option(
        min=0,
        max=MAX_SEED,
        help="Seed of the dataset and of training (default: the data's and the run's, else 0).",
        show_default=False,
    ),
]
RunValSizeOption = Annotated[
    Optional[int],
    typer.Option(
        min=1,
        help=f"MNIST train images held out for validation (default: the data's, else {DEFAULT_VAL_SIZE}).",
        show_default=False,
    ),
]
RunLimitOption = Annotated[
    Optional[int],
    typer.Option(min=1, help="Keep at most N rows per split (default: the data's, else all).", show_default=False),
]

# --------------------------------------------------------------------------- training settings

Settings = dict[str, Any]  # TrainConfig field name → the value given on the command line, or None


def setting_option(name: str, kind: type, setting: Setting) -> Any:
    """The Typer option of one training setting: `--max-shift N`, or `--amp/--no-amp` for a
    bool; choices become a Literal (so shell completion offers them), `min`/`max` a range, and
    what click cannot check (finite floats, `above`) a callback; a float is parsed by
    _finite_float, which leaves its range to the callback too. None means: not given."""
    flag = "--" + name.replace("_", "-")
    value_type = Literal[setting.choices] if setting.choices else kind

    def check(value: Any) -> Any:
        problem = None if value is None else setting.problem(value)
        if problem is not None:
            raise typer.BadParameter(problem)
        return value

    option = typer.Option(
        f"{flag}/--no-{flag[2:]}" if kind is bool else flag,
        min=setting.min,
        max=setting.max,
        parser=_finite_float if kind is float else None,
        callback=check,
        help=setting.help,
        show_default=False,
        rich_help_panel=SETTINGS_PANEL,
    )
    return Annotated[Optional[value_type], option]


def _finite_float(text: str) -> float:
    """A float option's value, refused first when it is no finite number: typer checks a range
    before the callback, and NaN, which fails every comparison, would read "should be less than
    or equal to 10". With a parser typer shows the range in --help but leaves its check to the
    callback (Setting.problem), so each refusal names the rule it breaks."""
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise typer.BadParameter(f"{text} is not a finite number")
    return value


def with_setting_options(exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per training setting (except those in `exclude`) in place of
    its keyword-only `settings` parameter, which receives them as a Settings dict."""
    declared = [(name, kind, setting) for name, kind, setting in setting_fields() if name not in exclude]
    names = [name for name, _, _ in declared]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [param for param in inspect.signature(command).parameters.values() if param.name != "settings"]
        options = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=setting_option(name, kind, setting)
            )
            for name, kind, setting in declared
        ]

        @functools.wraps(command)
        def with_settings(**arguments: Any) -> Any:
            settings = {name: arguments.pop(name) for name in names}
            return command(**arguments, settings=settings)

        with_settings.__signature__ = inspect.Signature(own + options)  # what Typer reads the options from
        return with_settings

    return decorate
