"""The `mnistsum` command line: parse options, call a stage, print what it did."""

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from mnistsum_cli import __version__, report
from mnistsum_cli.artifacts import SPLITS, DataDir, RunDir, write_json
from mnistsum_cli.config import PRESETS, TrainConfig, preset
from mnistsum_cli.data import load_dataset, split_tensors
from mnistsum_cli.devices import select_device
from mnistsum_cli.errors import BadOption, Interrupted, MnistsumError
from mnistsum_cli.mnist import MNIST_DIR_ENV, load_mnist, resolve_source
from mnistsum_cli.models import ARCHITECTURES

app = typer.Typer(
    name="mnistsum",
    help="Predict the digit in an MNIST image and its sum with a random number 0-9.\n\n"
    "Stages, in order: [bold]prepare[/] → [bold]train[/] → [bold]evaluate[/] → [bold]plot[/].",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# --------------------------------------------------------------------------- shared options


def _choice(allowed):
    def check(value: Optional[str]) -> Optional[str]:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check


def _positive(value: Optional[float]) -> Optional[float]:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value} must be greater than 0")
    return value


DataOption = Annotated[Path, typer.Option("--data", help="Folder of the prepared Parquet splits.")]
ArtifactsOption = Annotated[Path, typer.Option("--artifacts", help="Folder `train` wrote.")]
MnistDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--mnist-dir",
        envvar=MNIST_DIR_ENV,
        help="Existing MNIST folder (holding MNIST/raw/*-ubyte); nothing is downloaded.",
        show_default=False,
    ),
]
GpuOption = Annotated[Optional[int], typer.Option("--gpu", min=0, help="Run on CUDA device N.", show_default=False)]
CpuOption = Annotated[bool, typer.Option("--cpu", help="Run on the CPU even when a GPU exists.")]


def _device(gpu: Optional[int], cpu: bool):
    device, notice = select_device(gpu, cpu)
    if notice:
        report.notice(notice)
    return device


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mnistsum {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Predict the digit in an MNIST image and its sum with a random number 0-9."""


# --------------------------------------------------------------------------- prepare


@app.command(epilog="Example: mnistsum prepare --mnist-dir ~/mnist --seed 0 --limit 2000")
def prepare(
    seed: Annotated[int, typer.Option(help="Seed of the random numbers and the val split.")] = 0,
    val_size: Annotated[int, typer.Option(min=1, help="MNIST train images held out for validation.")] = 5000,
    limit: Annotated[
        Optional[int], typer.Option(min=1, help="Keep at most N rows per split (quick runs).", show_default=False)
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the Parquet splits.")] = Path("data"),
    mnist_dir: MnistDirOption = None,
) -> None:
    """Write the train/val/test Parquet splits (stage 1).

    Reads MNIST through torchvision: from --mnist-dir when given, else downloaded into data/.
    Each row holds image_index, digit, a random number 0-9 and their sum.
    """
    from mnistsum_cli.prepare import PrepareOptions, prepare as prepare_stage

    mnist = load_mnist(resolve_source(mnist_dir))
    data = DataDir(out)
    columns = prepare_stage(mnist, PrepareOptions(seed=seed, val_size=val_size, limit=limit), data)
    report.prepare_summary(columns, {split: data.split(split) for split in SPLITS}, seed)


# --------------------------------------------------------------------------- train


@app.command(
    epilog="Examples: mnistsum train --gpu 0 · mnistsum train --preset cpu --cpu · "
    "mnistsum train --arch lenet --epochs 5 · mnistsum train --resume"
)
def train(
    preset_name: Annotated[
        Optional[str],
        typer.Option(
            "--preset",
            callback=_choice(list(PRESETS)),
            help=f"Named settings: {', '.join(PRESETS)} [default: default]. Options below override them.",
            show_default=False,
        ),
    ] = None,
    arch: Annotated[
        Optional[str],
        typer.Option(callback=_choice(list(ARCHITECTURES)), help=f"Architecture: {', '.join(ARCHITECTURES)}.", show_default=False),
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(callback=_positive, help="Peak learning rate.", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(min=0.0, show_default=False)] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(min=0.0, max=0.5, show_default=False)] = None,
    max_shift: Annotated[
        Optional[int], typer.Option(min=0, max=8, help="Random-shift augmentation in pixels.", show_default=False)
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, shuffling and augmentation.", show_default=False)] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA.", show_default=False)] = None,
    channels_last: Annotated[
        Optional[bool], typer.Option("--channels-last/--no-channels-last", help="channels_last on CUDA.", show_default=False)
    ] = None,
    compile_model: Annotated[
        Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model.", show_default=False)
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out.")] = False,
    gpu: GpuOption = None,
    cpu: CpuOption = False,
    data: DataOption = Path("data"),
    out: Annotated[Path, typer.Option("--out", help="Folder for weights, history and checkpoints.")] = Path("artifacts"),
    mnist_dir: MnistDirOption = None,
) -> None:
    """Train the two-headed model (stage 2).

    Writes model.safetensors (the epoch with the best validation sum accuracy), history.json,
    config.json, and a checkpoint every epoch that --resume continues from.
    """
    from mnistsum_cli.train import TrainData, saved_config, train as train_stage

    run = RunDir(out)
    overrides = dict(
        arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        label_smoothing=label_smoothing, max_shift=max_shift, seed=seed, amp=amp,
        channels_last=channels_last, compile=compile_model,
    )  # fmt: skip
    if resume:
        if preset_name is not None:
            raise BadOption("--resume continues with the checkpoint's settings: drop --preset")
        saved = saved_config(run)
        if saved is None:
            raise MnistsumError(f"nothing to resume in {out}: run `mnistsum train` without --resume")
        config = saved.with_overrides(**overrides)
    else:
        config = preset(preset_name or "default").with_overrides(**overrides)
    device = _device(gpu, cpu)

    started = time.perf_counter()
    dataset, mnist = load_dataset(DataDir(data), mnist_dir)
    train_data = TrainData(
        train=split_tensors(dataset, mnist, "train", device),
        val=split_tensors(dataset, mnist, "val", device),
        dataset_id=dataset.dataset_id,
    )
    loaded = time.perf_counter()
    try:
        with report.ProgressReporter() as reporter:
            state = train_stage(config, train_data, run, device, resume=resume, reporter=reporter)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: the last completed epoch is saved in {out}; continue with `mnistsum train --resume`"
        ) from None
    report.train_summary(
        state.history, state.best_epoch, time.perf_counter() - loaded, loaded - started, out, str(device)
    )


# --------------------------------------------------------------------------- evaluate


@app.command(epilog="Example: mnistsum evaluate --split test --json > metrics.json")
def evaluate(
    split: Annotated[str, typer.Option(callback=_choice(list(SPLITS)), help="Split to measure.")] = "test",
    data: DataOption = Path("data"),
    artifacts: ArtifactsOption = Path("artifacts"),
    mnist_dir: MnistDirOption = None,
    gpu: GpuOption = None,
    cpu: CpuOption = False,
    force: Annotated[bool, typer.Option("--force", help="Evaluate even if the model was trained on other data.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON on stdout.")] = False,
) -> None:
    """Measure both heads on a split (stage 3).

    Digit and sum accuracy, losses, per-digit accuracy, confusion matrices and consistency;
    written to evaluation_<split>.json beside the model.
    """
    from mnistsum_cli.evaluate import check_model_matches, evaluate as evaluate_stage, provenance
    from mnistsum_cli.modelio import load_model

    device = _device(gpu, cpu)
    run = RunDir(artifacts)
    model, meta = load_model(run.model, device)
    dataset, mnist = load_dataset(DataDir(data), mnist_dir)
    check_model_matches(meta, dataset, force)
    metrics = evaluate_stage(model, split, split_tensors(dataset, mnist, split, device), dataset.splits[split].image_index)
    metrics.update(provenance(run.model, meta, dataset))
    write_json(run.evaluation(split), metrics)
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        report.evaluation_summary(metrics, run.evaluation(split))


# --------------------------------------------------------------------------- plot


@app.command(epilog="Example: mnistsum plot --artifacts artifacts")
def plot(
    artifacts: ArtifactsOption = Path("artifacts"),
    force: Annotated[bool, typer.Option("--force", help="Plot even if the history or evaluation is from another run.")] = False,
) -> None:
    """Draw loss, accuracy and confusion plots (stage 4).

    Curves from history.json; confusion heatmaps for each current evaluation. PNGs go to
    <artifacts>/plots.
    """
    from mnistsum_cli.plot import plot as plot_stage

    report.written(plot_stage(RunDir(artifacts), force))


# --------------------------------------------------------------------------- entry point


def main(argv: Optional[List[str]] = None) -> None:
    """Run the CLI; every failure is one line on stderr and an exit code (1 failure, 2 usage, 130 Ctrl-C)."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="mnistsum", standalone_mode=False)
    except MnistsumError as error:
        report.error(str(error))
        sys.exit(error.exit_code)
    except Exception as error:
        if not _is_usage_error(error):
            raise
        if type(error).__name__ == "NoArgsIsHelpError":
            error.show()
        else:
            context = getattr(error, "ctx", None)
            where = context.command_path if context is not None else "mnistsum"
            report.error(f"{error.format_message()} (see `{where} --help`)")
        sys.exit(error.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(error: Exception) -> bool:
    """Click's (or Typer's vendored click's) usage errors, recognised without importing either."""
    return any(cls.__name__ == "ClickException" for cls in type(error).__mro__)
