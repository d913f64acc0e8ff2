"""The `mnistsum` command line: parse options, call a stage, print what it did."""

import functools
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, List, Literal, Optional

import typer

from mnistsum_cli import __version__, terminal
from mnistsum_cli.cli import report
from mnistsum_cli.cli.commands import Command, CommandGroup
from mnistsum_cli.cli.options import (
    ArtifactsOption,
    CpuOption,
    DataOption,
    ForceOption,
    GpuOption,
    LimitOption,
    MnistDirOption,
    OutOption,
    PresetOption,
    RunLimitOption,
    RunSeedOption,
    RuntimeOption,
    RunValSizeOption,
    Settings,
    SplitOption,
    ValSizeOption,
    with_setting_options,
)
from mnistsum_cli.data.prepare import DEFAULT_VAL_SIZE
from mnistsum_cli.errors import BadOption, MnistsumError, OutputClosed, OutputFailed
from mnistsum_cli.serve.workers import MAX_DEFAULT_WORKERS
from mnistsum_cli.settings import MAX_SEED
from mnistsum_cli.store.diskfiles import fault_text, require
from mnistsum_cli.store.paths import (
    DEFAULT_ARTIFACTS,
    DEFAULT_DATA,
    IMAGE_FILE_FORMATS,
    SPLITS,
    DataDir,
    RunDir,
    formats_text,
)
from mnistsum_cli.store.schemas import HISTORY, MODEL_META, SPLIT_META
from mnistsum_cli.store.validation import Schema
from mnistsum_cli.torchrun import torchrun_rank

if TYPE_CHECKING:  # torch loads inside the commands that need it: --help and usage errors stay fast
    import torch


app = typer.Typer(
    cls=CommandGroup,
    name="mnistsum",
    help="Predict the digit in an MNIST image and its sum with a random number 0-9.\n\n"
    "Stages, in order: [bold]prepare[/] → [bold]train[/] → [bold]evaluate[/] → [bold]plot[/]; "
    "[bold]run[/] does all four, [bold]status[/] tells which are up to date.",
    epilog="Example: mnistsum run --mnist-dir ~/mnist --preset cpu --cpu  (or the four stages one by one)",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _device(gpu: Optional[int], cpu: bool) -> "torch.device":
    from mnistsum_cli.training.devices import select_device

    device, notice = select_device(gpu, cpu)
    if notice:
        terminal.notice(notice)
    return device


def _runtime_device(runtime: str, gpu: Optional[int], cpu: bool) -> Optional["torch.device"]:
    """torch's device for --runtime torch; None for onnx, which runs on the CPU and loads no torch."""
    if runtime == "onnx":
        if gpu is not None:
            raise BadOption("--runtime onnx runs on the CPU: drop --gpu")
        return None
    return _device(gpu, cpu)


def _folder(new: Path, new_flag: str, out: Optional[Path], default: Path) -> Path:
    """The folder of `new_flag`, or of the deprecated --out (with a one-line note)."""
    if out is None:
        return new
    if new != default:
        raise BadOption(f"--out is the old name of {new_flag}: pass only {new_flag}")
    terminal.notice(f"--out is deprecated and will be removed: use {new_flag} {out}")
    return out


def _require(*inputs: tuple[Path, Schema]) -> None:
    """Refuse a missing or unreadable input (path, its kind) in one line before a command imports
    torch (seconds and hundreds of MB), as the later read would."""
    for path, kind in inputs:
        require(path, kind.max_bytes, kind.stage)


def _splits(data: Path) -> list[tuple[Path, Schema]]:
    """The three splits of a data folder, as inputs of _require."""
    return [(DataDir(data).split(name), SPLIT_META) for name in SPLITS]


def _notice_if(message: Optional[str]) -> None:
    if message is not None:
        terminal.notice(message)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mnistsum {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    context: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Predict the digit in an MNIST image and its sum with a random number 0-9."""
    if torchrun_rank() is not None and context.invoked_subcommand != "train":
        raise BadOption(
            f"`mnistsum {context.invoked_subcommand}` runs in one process: start it without torchrun (only `train` runs under torchrun)"
        )


# --------------------------------------------------------------------------- the stages


@app.command(cls=Command, epilog="Example: mnistsum prepare --mnist-dir ~/mnist --seed 0 --limit 2000")
def prepare(
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the random numbers and the val split.")] = 0,
    val_size: ValSizeOption = DEFAULT_VAL_SIZE,
    limit: LimitOption = None,
    data: DataOption = DEFAULT_DATA,
    mnist_dir: MnistDirOption = None,
    out: OutOption = None,
) -> None:
    """Write the train/val/test Parquet splits (stage 1).

    Reads MNIST through torchvision: from --mnist-dir when given, else downloaded into data/. Each row holds image_index, digit, a random number 0-9 and their sum.
    """
    from mnistsum_cli.data.mnist import load_mnist, resolve_source
    from mnistsum_cli.data.prepare import PrepareOptions
    from mnistsum_cli.data.prepare import prepare as prepare_stage
    from mnistsum_cli.store.locks import folder_lock

    folder = DataDir(_folder(data, "--data", out, DEFAULT_DATA))
    with folder_lock(folder.root, "prepare", "--data"):  # a second prepare waits; a failure leaves no new folder
        mnist = load_mnist(resolve_source(mnist_dir))
        columns = prepare_stage(mnist, PrepareOptions(seed=seed, val_size=val_size, limit=limit), folder)
    report.prepare_summary(columns, folder, seed)


@app.command(
    cls=Command,
    epilog="Examples: mnistsum train --gpu 0 · mnistsum train --preset cpu --cpu · "
    "mnistsum train --arch lenet --epochs 5 · mnistsum train --resume",
)
@with_setting_options()
def train(
    preset_name: PresetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run saved in --artifacts with its settings.")
    ] = False,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Also write TensorBoard events (needs the tensorboard package).")
    ] = False,
    tensorboard_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--tensorboard-dir",
            help="Where --tensorboard writes (implies it): DIR/<run id>/ (default: <artifacts>/tensorboard).",
            show_default=False,
        ),
    ] = None,
    gpu: GpuOption = None,
    cpu: CpuOption = False,
    data: DataOption = DEFAULT_DATA,
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    mnist_dir: MnistDirOption = None,
    out: OutOption = None,
    *,
    settings: Settings,
) -> None:
    """Train the two-headed model (stage 2).

    Writes model.safetensors (the epoch with the best validation sum accuracy), history.json, config.json, and a checkpoint every epoch that --resume continues from. A run already in --artifacts moves to <artifacts>/previous/<run id>/ when the first epoch is saved.
    """
    run_dir = RunDir(_folder(artifacts, "--artifacts", out, DEFAULT_ARTIFACTS))
    if resume and preset_name is not None:
        raise BadOption("--resume continues with the checkpoint's settings: drop --preset")
    if not resume:  # (--resume of a complete run needs no data: it says so and stops)
        _require(*_splits(data))
    from mnistsum_cli.data.prepared import PreparedData
    from mnistsum_cli.store.schemas import HISTORY
    from mnistsum_cli.training.checkpoint import saved_config
    from mnistsum_cli.training.distributed import process_group
    from mnistsum_cli.training.loop import SilentReporter
    from mnistsum_cli.training.run import choose_config, continue_command, run_training, saved_run
    from mnistsum_cli.training.tensorboard_log import check_installed, default_log_root, tensorboard_events

    if resume:
        saved = saved_config(run_dir)
        if saved is None:
            raise MnistsumError(
                f"nothing to resume in {run_dir.root} (no {run_dir.checkpoint.name}): run `mnistsum train` without --resume"
            )
        done = saved_run(run_dir)
        if done is not None and done.complete and saved.with_overrides(**settings) == saved == done.config:
            HISTORY.read_json(run_dir.history)  # complete means whole: a damaged history is an error, not "done"
            report.run_complete(run_dir, done.epoch)
            return
    if tensorboard or tensorboard_dir is not None:
        check_installed()
        tensorboard_dir = tensorboard_dir or default_log_root(run_dir)
    with process_group(gpu, cpu, notify=terminal.notice) as (group, device):
        if resume:
            config = saved.with_overrides(**settings)
        else:
            config, chosen = choose_config(preset_name, settings, lambda: device.type)
            if group.is_main:
                _notice_if(chosen)
        notify = terminal.notice if group.is_main else (lambda message: None)  # under torchrun rank 0 alone speaks
        with report.ProgressReporter() if group.is_main else nullcontext(SilentReporter()) as reporter:
            with tensorboard_events(reporter, run_dir, tensorboard_dir if group.is_main else None) as reporter:
                outcome = run_training(
                    config,
                    PreparedData(DataDir(data), mnist_dir),
                    run_dir,
                    device,
                    resume=resume,
                    continue_with=continue_command("train --resume", run_dir),
                    notify=notify,
                    reporter=reporter,
                    group=group,
                )
        if group.is_main:
            report.train_summary(
                outcome, run_dir, f"{device} x {group.world_size} processes" if group.active else str(device)
            )


@app.command(cls=Command, epilog="Example: mnistsum evaluate --split test --json > metrics.json")
def evaluate(
    split: SplitOption = "test",
    data: DataOption = DEFAULT_DATA,
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    mnist_dir: MnistDirOption = None,
    gpu: GpuOption = None,
    cpu: CpuOption = False,
    force: ForceOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON on stdout.")] = False,
) -> None:
    """Measure both heads on a split (stage 3).

    Digit and sum accuracy, losses, per-digit accuracy, confusion matrices and consistency (predicted sum = predicted digit + number); written to evaluation_<split>.json.
    """
    run_dir = RunDir(artifacts)
    _require((run_dir.model, MODEL_META), *_splits(data))
    from mnistsum_cli.data.prepared import PreparedData
    from mnistsum_cli.evaluation.evaluate import evaluate_model

    metrics = evaluate_model(split, PreparedData(DataDir(data), mnist_dir), run_dir, _device(gpu, cpu), force)
    if as_json:
        terminal.print_json(metrics)
    else:
        report.evaluation_summary(metrics, run_dir.evaluation(split))


@app.command(cls=Command, epilog="Example: mnistsum plot --artifacts artifacts")
def plot(
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    data: DataOption = DEFAULT_DATA,
    mnist_dir: MnistDirOption = None,
    force: ForceOption = False,
) -> None:
    """Draw loss, accuracy, confusion and misclassified-example plots (stage 4).

    Curves from history.json; for each current evaluation, confusion heatmaps and a gallery of the rows it got wrong. PNGs go to <artifacts>/plots.
    """
    run_dir = RunDir(artifacts)
    _require((run_dir.history, HISTORY), (run_dir.model, MODEL_META))
    from mnistsum_cli.data.prepared import PreparedData
    from mnistsum_cli.evaluation.plot import plot as plot_stage

    report.written(plot_stage(run_dir, force, PreparedData(DataDir(data), mnist_dir)))


@app.command(
    cls=Command,
    epilog="Examples: mnistsum predict seven.png --number 5 · mnistsum predict a.png b.jpg --number 3 --json · "
    "mnistsum predict --index 42 --split test",
)
def predict(
    images: Annotated[
        Optional[List[Path]],
        typer.Argument(help=f"{formats_text(IMAGE_FILE_FORMATS)} files, any size or colour.", show_default=False),
    ] = None,
    number: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            max=9,
            help="The number 0-9 to add; with --index it replaces the row's number (default: the row's).",
            show_default=False,
        ),
    ] = None,
    index: Annotated[
        Optional[int], typer.Option(min=0, help="Predict row K of --split instead of files.", show_default=False)
    ] = None,
    split: SplitOption = "test",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: an object for one image, a list for several.")
    ] = False,
    data: DataOption = DEFAULT_DATA,
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    mnist_dir: MnistDirOption = None,
    gpu: GpuOption = None,
    cpu: CpuOption = False,
    runtime: RuntimeOption = "torch",
) -> None:
    """Predict the digit and the sum for image files or a dataset row.

    Images are brought to MNIST form: greyscale, inverted when the background is light, the digit scaled to 20 px and centred by its centre of mass in 28 x 28. --runtime onnx answers with model.onnx on onnxruntime (image files load no torch); the output names the runtime.
    """
    if index is None and not images:
        raise BadOption("give image files with --number N, or --index K to predict a dataset row")
    if index is not None and images:
        raise BadOption("give either image files or --index, not both")
    if images and number is None:
        raise BadOption("--number N (0-9) is required with image files")
    _require((RunDir(artifacts).model, MODEL_META), *(_splits(data) if index is not None else []))
    from mnistsum_cli.data.prepared import PreparedData
    from mnistsum_cli.evaluation.onnx_runtime import onnx_extra
    from mnistsum_cli.evaluation.predict import predict_files, predict_row

    device = _runtime_device(runtime, gpu, cpu)
    with onnx_extra("predict --runtime onnx"):
        if index is not None:
            prepared = PreparedData(DataDir(data), mnist_dir)
            results = [predict_row(index, split, number, prepared, RunDir(artifacts), device, runtime)]
        else:
            results = predict_files(images, number, RunDir(artifacts), device, runtime)
    if as_json:
        terminal.print_json(results[0] if len(results) == 1 else results)
    else:
        report.predictions_table(results)


@app.command(
    cls=Command,
    epilog="Examples: mnistsum export · mnistsum export --out lean.onnx --opset 20 · "
    "mnistsum predict seven.png --number 5 --runtime onnx",
)
def export(
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="ONNX file to write (default: <artifacts>/model.onnx).", show_default=False),
    ] = None,
    opset: Annotated[
        Optional[int],
        typer.Option(help="ONNX opset of the graph (default: the exporter's).", show_default=False),
    ] = None,
    data: DataOption = DEFAULT_DATA,
    mnist_dir: MnistDirOption = None,
) -> None:
    """Export the run's model as model.onnx, for onnxruntime and other ONNX runtimes.

    One file, weights inside; inputs: images uint8 [N, 28, 28] in MNIST form (normalised inside the graph) and numbers int64 [N]; outputs: both heads' probabilities and logits (docs/export.md). Before it is written, onnxruntime and torch must agree on the whole test split of --data. Needs the onnx extra: pip install 'mnistsum\\[onnx]'.
    """
    from mnistsum_cli.evaluation.onnx_runtime import onnx_extra

    with onnx_extra("export"):
        from mnistsum_cli.data.prepared import PreparedData
        from mnistsum_cli.export import export_model

        exported = export_model(RunDir(artifacts), PreparedData(DataDir(data), mnist_dir), out, opset)
    report.export_summary(exported)


@app.command(cls=Command, epilog="Example: mnistsum serve --artifacts artifacts --cpu  (then open the URL it prints)")
def serve(
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but loopback lets others use the model.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to listen on (0: any free port).")] = 8000,
    gpu: GpuOption = None,
    cpu: CpuOption = False,
    workers: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help=f"Server processes sharing the port (default: one per core it may use, by its affinity mask and its cgroup's CPU quota, at most {MAX_DEFAULT_WORKERS}, on the CPU; 1 on a GPU).",
            show_default=False,
        ),
    ] = None,
    runtime: RuntimeOption = "torch",
) -> None:
    """Serve a local page to draw a digit and pick a number, and a JSON API, until Ctrl-C.

    The page shows both heads' answers with their probabilities and the 28 x 28 image the model saw (prepared as by predict). The model follows --artifacts: a newly trained model.safetensors answers the next request (with --runtime onnx, a newly exported model.onnx of it). Needs the serve extra: pip install 'mnistsum\\[serve]'.
    """
    if RunDir(artifacts).root.is_dir():  # else serve says the folder is missing
        _require((RunDir(artifacts).model, MODEL_META))
    try:
        from mnistsum_cli.serve.app import serve as serve_stage
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in ("starlette", "uvicorn", "python_multipart"):
            raise
        raise MnistsumError(
            f"`mnistsum serve` needs Starlette, uvicorn and python-multipart ({error.name} is missing): "
            "pip install 'mnistsum[serve]'"
        ) from None

    from mnistsum_cli.evaluation.onnx_runtime import onnx_extra

    device = _runtime_device(runtime, gpu, cpu)
    with onnx_extra("serve --runtime onnx"):
        serve_stage(RunDir(artifacts), host, port, device, workers, typer.echo, terminal.warning, runtime)


# --------------------------------------------------------------------------- the pipeline


@app.command(cls=Command, epilog="Example: mnistsum run --mnist-dir ~/mnist --preset cpu --cpu")
@with_setting_options(exclude=("seed",))
def run(
    preset_name: PresetOption = None,
    seed: RunSeedOption = None,
    val_size: RunValSizeOption = None,
    limit: RunLimitOption = None,
    split: SplitOption = "test",
    force: Annotated[bool, typer.Option("--force", help="Redo every stage, up to date or not.")] = False,
    export: Annotated[
        bool, typer.Option("--export", help="Also export model.onnx (as `mnistsum export`; needs the onnx extra).")
    ] = False,
    gpu: GpuOption = None,
    cpu: CpuOption = False,
    data: DataOption = DEFAULT_DATA,
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    mnist_dir: MnistDirOption = None,
    *,
    settings: Settings,
) -> None:
    """Run prepare → train → evaluate → plot, skipping stages already up to date.

    A stage is up to date when its outputs were made from the current outputs of the stage before it with the same options; options left out keep the settings of the data and of the run in --artifacts (as `status` judges them). A new training run moves the previous one to <artifacts>/previous/<run id>/ when its first epoch is saved. --force redoes every stage.
    """
    from mnistsum_cli.data.prepared import PreparedData
    from mnistsum_cli.pipeline import run_pipeline, wanted_config, wanted_prepare_options

    if export:
        from mnistsum_cli.evaluation.onnx_runtime import require_extra

        require_extra("run --export")  # before any stage runs
    prepared, run_dir = PreparedData(DataDir(data), mnist_dir), RunDir(artifacts)
    device = functools.cache(lambda: _device(gpu, cpu))  # found when a stage needs it: that loads torch
    if gpu is not None:
        device()  # a --gpu that cannot work is refused before any stage runs
    config, chosen = wanted_config(run_dir, preset_name, {**settings, "seed": seed}, lambda: device().type)
    _notice_if(chosen)
    prepare_options = wanted_prepare_options(prepared, seed, val_size, limit)
    with report.ProgressReporter() as reporter:
        stages = run_pipeline(
            prepare_options, config, split, prepared, run_dir, device, terminal.notice, reporter, force, export
        )
        for stage, skipped, result in stages:
            device_name = str(device()) if stage == "train" and skipped is None else ""
            report.stage_done(stage, skipped, result, prepared.folder, run_dir, device_name, prepare_options.seed)


@app.command(cls=Command, epilog="Example: mnistsum status --json")
def status(
    data: DataOption = DEFAULT_DATA,
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    split: SplitOption = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON on stdout.")] = False,
) -> None:
    """Show each stage's artifacts: present, up to date or stale, with key figures."""
    from mnistsum_cli.data.prepared import PreparedData
    from mnistsum_cli.pipeline import status as pipeline_status

    stages = pipeline_status(PreparedData(DataDir(data)), RunDir(artifacts), split)
    if as_json:
        terminal.print_json([stage.to_dict() for stage in stages])
    else:
        report.status_table(stages)


# --------------------------------------------------------------------------- searching settings


@app.command(
    cls=Command,
    epilog="Examples: mnistsum sweep --trials 20 --jobs 2 --cpu · mnistsum sweep --show · "
    "mnistsum sweep --storage postgresql+psycopg://user@host/db --study s1  (on each machine)",
)
def sweep(
    study: Annotated[str, typer.Option("--study", help="Study name: its folder is <artifacts>/sweeps/NAME.")] = "sweep",
    trials: Annotated[
        int, typer.Option("--trials", min=1, help="Run until the study holds N finished (complete or pruned) trials.")
    ] = 20,
    jobs: Annotated[
        Optional[int],
        typer.Option(
            "--jobs",
            min=1,
            help="Trials at a time here, one process each (default 1; --gpus: one per GPU).",
            show_default=False,
        ),
    ] = None,
    gpus: Annotated[
        Optional[str],
        typer.Option(
            "--gpus",
            help="GPUs to use, e.g. 0,1: one trial per GPU at a time.",
            show_default=False,
            rich_help_panel="Device",
        ),
    ] = None,
    storage: Annotated[
        Optional[str],
        typer.Option(
            "--storage",
            help="Optuna storage URL shared by every process (default: sqlite:///<study folder>/study.db).",
            show_default=False,
        ),
    ] = None,
    space: Annotated[
        Optional[Path],
        typer.Option(
            "--space",
            help="TOML file of the settings to search (default: the device's space, docs/sweep.md).",
            show_default=False,
        ),
    ] = None,
    preset_name: PresetOption = None,
    objective: Annotated[
        Optional[Literal["accuracy", "accuracy,time"]],
        typer.Option(
            "--objective",
            help="accuracy (val sum; the default), or accuracy,time for the Pareto front with training seconds.",
            show_default=False,
        ),
    ] = None,
    pruner: Annotated[
        Literal["median", "hyperband", "none"],
        typer.Option("--pruner", help="Stop hopeless trials at an epoch's end (median: Optuna's MedianPruner)."),
    ] = "median",
    timeout: Annotated[
        Optional[float],
        typer.Option("--timeout", min=0, help="Start no trial after this many seconds.", show_default=False),
    ] = None,
    seed: Annotated[
        Optional[int],
        typer.Option(
            "--seed",
            min=0,
            max=MAX_SEED,
            help="Seed of the sampler (with the job's number and the trials so far).",
            show_default=False,
        ),
    ] = None,
    heartbeat: Annotated[
        int,
        typer.Option(
            "--heartbeat",
            min=1,
            help="Seconds between a trial's heartbeats; one silent 3x as long is failed and retried once.",
        ),
    ] = 10,
    show: Annotated[bool, typer.Option("--show", help="Print the study's trials; run nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --show: JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="With --show: CSV.")] = False,
    cpu: CpuOption = False,
    data: DataOption = DEFAULT_DATA,
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    mnist_dir: MnistDirOption = None,
) -> None:
    """Search training settings with Optuna: each trial a run folder in <artifacts>/sweeps/<study>/trial-<n>/.

    Trials maximise validation sum accuracy (never the test split). Running the command again continues the study; another machine joins with the same --storage and --study. At the end: the best trial's `mnistsum train` command, and plots in the study folder. Needs the sweep extra: pip install 'mnistsum\\[sweep]'.
    """
    from mnistsum_cli.sweep.study import check_installed, show_study, start_sweep

    check_installed()
    if as_json and as_csv:
        raise BadOption("pass --json or --csv, not both")
    if (as_json or as_csv) and not show:
        raise BadOption("--json and --csv go with --show")
    if show:
        show_study(study, storage, artifacts, as_json, as_csv)
        return
    start_sweep(
        study=study,
        trials=trials,
        jobs=jobs,
        gpus=gpus,
        storage=storage,
        space=space,
        preset_name=preset_name,
        objective=objective,
        pruner=pruner,
        timeout=timeout,
        seed=seed,
        heartbeat=heartbeat,
        cpu=cpu,
        data=data,
        artifacts=artifacts,
        mnist_dir=mnist_dir,
    )


# --------------------------------------------------------------------------- runs side by side


@app.command(
    "runs",
    cls=Command,
    epilog="Examples: mnistsum runs · mnistsum runs --sort val_sum_accuracy · mnistsum runs --csv > runs.csv",
)
def runs_command(
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    as_json: Annotated[bool, typer.Option("--json", help="Print every column of every run as a JSON list.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print every column of every run as CSV.")] = False,
    sort: Annotated[
        str, typer.Option("--sort", help="Column to sort by, e.g. started, val_sum_accuracy, arch.")
    ] = "started",
) -> None:
    """List the training runs in --artifacts: the current one and each kept in previous/.

    One row per run: id, start, state (complete, or interrupted at epoch k of n), the settings that differ between the runs (the others in the caption), device, precision, processes, training seconds, kept epoch, val and test accuracy. --json and --csv print all settings.
    """
    from mnistsum_cli.training.runlist import as_csv as csv_text
    from mnistsum_cli.training.runlist import differing_settings, list_runs

    if as_json and as_csv:
        raise BadOption("pass --json or --csv, not both")
    entries = list_runs(artifacts, sort)
    if as_json:
        terminal.print_json([entry.row for entry in entries])
    elif as_csv:
        typer.echo(csv_text(entries), nl=False)
    else:
        report.runs_table(entries, *differing_settings(entries), artifacts)


@app.command(
    cls=Command,
    epilog="Examples: mnistsum compare 954dde2b 1f0c artifacts/previous/77aa01c3d5e2b4f0 · "
    "mnistsum compare RUN RUN --out lenet-vs-convnet.png",
)
def compare(
    run_names: Annotated[
        List[str],
        typer.Argument(metavar="RUN...", help="Run ids (or unique prefixes) from `mnistsum runs`, or run folders."),
    ],
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="PNG to write (default: <artifacts>/compare/<ids>.png).", show_default=False),
    ] = None,
) -> None:
    """Draw runs side by side: val accuracy of both heads and train loss, labelled by what differs.

    The current run's plots/ is left as it is.
    """
    from mnistsum_cli.training.runlist import compare_labels, compare_output, find_run

    entries = [find_run(artifacts, name) for name in run_names]
    labels, caption = compare_labels(entries)
    path = compare_output(out, artifacts, entries)  # before matplotlib loads
    from mnistsum_cli.evaluation.plot import compare_runs

    report.written([compare_runs([entry.history for entry in entries], labels, caption, path)])


# --------------------------------------------------------------------------- entry point


def main(argv: Optional[List[str]] = None) -> None:
    """Run the CLI; every failure is one line on stderr and an exit code (1 failure, 2 usage,
    130 Ctrl-C, 141 when the reader of stdout went away, as in `mnistsum evaluate | head`)."""
    _degrade_unencodable_output()
    stdout = sys.stdout
    sys.stdout = _GuardedStdout(stdout)
    try:
        try:
            _main(argv)
        finally:
            sys.stdout.flush()  # what is still buffered fails here, while it can be reported
    except (OutputClosed, BrokenPipeError):
        _quiet_stdout()
        sys.exit(OutputClosed.exit_code)
    except OutputFailed as error:
        terminal.error(f"cannot write to standard output: {error}")
        _quiet_stdout()
        sys.exit(OutputFailed.exit_code)
    finally:
        sys.stdout = stdout


def _degrade_unencodable_output() -> None:
    """Characters the terminal's encoding lacks (the bars and arrows under LC_ALL=C, where
    Python writes ASCII) print as '?' rather than stop a command whose files are written."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


class _GuardedStdout:
    """sys.stdout whose write errors (`> /dev/full`) raise OutputFailed, so that they are told
    apart from errors writing the artifacts; a closed pipe stays a BrokenPipeError."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as error:
            raise OutputFailed(error) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as error:
            raise OutputFailed(error) from None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _main(argv: Optional[List[str]]) -> None:
    command = typer.main.get_command(app)
    quiet = (torchrun_rank() or 0) != 0  # under torchrun rank 0 alone reports; the ranks agree on errors
    try:
        code = command.main(args=argv, prog_name="mnistsum", standalone_mode=False)
    except MnistsumError as error:
        if not quiet:
            terminal.error(str(error))
        sys.exit(error.exit_code)
    except BrokenPipeError:
        raise  # the reader of stdout went away: main() exits quietly
    except OSError as error:  # the last resort for a file-system fault no stage put in its own words
        if not quiet:
            terminal.error(fault_text(None, error))
        sys.exit(1)
    except Exception as error:
        if not _is_usage_error(error):
            raise
        if quiet:
            sys.exit(error.exit_code)
        if type(error).__name__ == "NoArgsIsHelpError":
            error.show()
        else:
            context = getattr(error, "ctx", None)
            where = context.command_path if context is not None else "mnistsum"
            terminal.error(f"{error.format_message()} (see `{where} --help`)")
        sys.exit(error.exit_code)
    if code == 130 and not quiet:  # Typer turns Ctrl-C outside our handlers into exit code 130
        terminal.error("interrupted")
    sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(error: Exception) -> bool:
    """Click's (or Typer's vendored click's) usage errors, recognised without importing either."""
    return any(cls.__name__ == "ClickException" for cls in type(error).__mro__)
