"""The pipeline's commands: the four stages (prepare, train, evaluate, plot), `run`, which chains
them and skips those up to date, and `status`, which tells which are. Each checks its inputs and
--gpu before it imports the stage (and with it torch)."""

import functools
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from mnistsum_cli import terminal
from mnistsum_cli.cli import preflight, report
from mnistsum_cli.cli.commands import Command, app
from mnistsum_cli.cli.options import (
    ArtifactsOption,
    CpuOption,
    DataOption,
    GpuOption,
    LimitOption,
    MnistDirOption,
    PresetOption,
    RunLimitOption,
    RunSeedOption,
    RunValSizeOption,
    Settings,
    ValSizeOption,
    split_option,
    with_setting_options,
)
from mnistsum_cli.data.prepare import DEFAULT_VAL_SIZE
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.settings import MAX_SEED
from mnistsum_cli.store.paths import DEFAULT_ARTIFACTS, DEFAULT_DATA, DataDir, RunDir
from mnistsum_cli.store.schemas import HISTORY, MODEL_META


@app.command(cls=Command, epilog="Example: mnistsum prepare --mnist-dir ~/mnist --seed 0 --limit 2000")
def prepare(
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the random numbers and the val split.")] = 0,
    val_size: ValSizeOption = DEFAULT_VAL_SIZE,
    limit: LimitOption = None,
    data: DataOption = DEFAULT_DATA,
    mnist_dir: MnistDirOption = None,
) -> None:
    """Write the train/val/test Parquet splits (stage 1).

    Reads MNIST through torchvision: from --mnist-dir when given, else downloaded into the --data folder. Each row holds image_index, digit, a random number 0-9 and their sum.
    """
    from mnistsum_cli.data.mnist import load_mnist, resolve_source
    from mnistsum_cli.data.prepare import PrepareOptions
    from mnistsum_cli.data.prepare import prepare as prepare_stage
    from mnistsum_cli.store.locks import folder_lock

    folder = DataDir(data)
    with folder_lock(folder.root, "prepare", "--data"):  # a second prepare waits; a failure leaves no new folder
        mnist = load_mnist(resolve_source(mnist_dir, default_root=folder.root))
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
    *,
    settings: Settings,
) -> None:
    """Train the two-headed model (stage 2).

    Writes model.safetensors (the epoch with the best validation sum accuracy), history.json, config.json, and a checkpoint every epoch that --resume continues from. A run already in --artifacts moves to <artifacts>/previous/<run id>/ when the first epoch is saved.
    """
    run_dir = RunDir(artifacts)
    if resume and preset_name is not None:
        raise BadOption("--resume continues with the checkpoint's settings: drop --preset")
    preflight.refuse_impossible_device(gpu, cpu)
    if not resume:  # (--resume of a complete run needs no data: it says so and stops)
        preflight.require_inputs(*preflight.splits(data))
    from mnistsum_cli.data.splitdata import SplitData
    from mnistsum_cli.training.distributed import process_group
    from mnistsum_cli.training.loop import SilentReporter
    from mnistsum_cli.training.run import Run, resume_settings
    from mnistsum_cli.training.session import choose_config, continue_command, run_training
    from mnistsum_cli.training.tensorboard_log import check_installed, default_log_root, tensorboard_events

    if resume:
        saved = resume_settings(run_dir)
        if saved is None:
            raise MnistsumError(
                f"nothing to resume in {run_dir.root} (no {run_dir.checkpoint.name}): run `mnistsum train` without --resume"
            )
        done = Run.saved(run_dir)
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
                preflight.notice_if(chosen)
        notify = terminal.notice if group.is_main else (lambda message: None)  # under torchrun rank 0 alone speaks
        with report.ProgressReporter() if group.is_main else nullcontext(SilentReporter()) as reporter:
            with tensorboard_events(reporter, run_dir, tensorboard_dir if group.is_main else None) as reporter:
                run = run_training(
                    config,
                    SplitData(DataDir(data), mnist_dir),
                    run_dir,
                    device,
                    resume=resume,
                    continue_with=continue_command("train --resume", run_dir),
                    notify=notify,
                    reporter=reporter,
                    group=group,
                )
        if group.is_main:
            report.train_summary(run, f"{device} x {group.world_size} processes" if group.active else str(device))


@app.command(cls=Command, epilog="Example: mnistsum evaluate --split test --json > metrics.json")
def evaluate(
    split: split_option("Split to measure.") = "test",
    data: DataOption = DEFAULT_DATA,
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    mnist_dir: MnistDirOption = None,
    gpu: GpuOption = None,
    cpu: CpuOption = False,
    allow_mismatch: Annotated[
        bool, typer.Option("--allow-mismatch", help="Evaluate even a model trained on another dataset.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON on stdout.")] = False,
) -> None:
    """Measure both heads on a split (stage 3).

    Digit and sum accuracy, losses, per-digit accuracy, confusion matrices and consistency (predicted sum = predicted digit + number); written to evaluation_<split>.json.
    """
    run_dir = RunDir(artifacts)
    preflight.refuse_impossible_device(gpu, cpu)
    preflight.require_inputs((run_dir.model, MODEL_META), *preflight.splits(data))
    from mnistsum_cli.data.splitdata import SplitData
    from mnistsum_cli.evaluation.evaluate import evaluate_model

    metrics = evaluate_model(
        split, SplitData(DataDir(data), mnist_dir), run_dir, preflight.device(gpu, cpu), allow_mismatch
    )
    if as_json:
        terminal.print_json(metrics)
    else:
        report.evaluation_summary(metrics, run_dir.evaluation(split))


@app.command(cls=Command, epilog="Example: mnistsum plot --artifacts artifacts")
def plot(
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    data: DataOption = DEFAULT_DATA,
    mnist_dir: MnistDirOption = None,
    allow_mismatch: Annotated[
        bool,
        typer.Option("--allow-mismatch", help="Plot even a history or evaluations that belong to another run's model."),
    ] = False,
) -> None:
    """Draw loss, accuracy, confusion and misclassified-example plots (stage 4).

    Curves from history.json; for each current evaluation, confusion heatmaps and a gallery of the rows it got wrong. PNGs go to <artifacts>/plots.
    """
    run_dir = RunDir(artifacts)
    preflight.require_inputs((run_dir.history, HISTORY), (run_dir.model, MODEL_META))
    from mnistsum_cli.data.splitdata import SplitData
    from mnistsum_cli.evaluation.plot import plot as plot_stage

    report.written(plot_stage(run_dir, allow_mismatch, SplitData(DataDir(data), mnist_dir)))


# --------------------------------------------------------------------------- the pipeline


@app.command(cls=Command, epilog="Example: mnistsum run --mnist-dir ~/mnist --preset cpu --cpu")
@with_setting_options(exclude=("seed",))
def run(
    preset_name: PresetOption = None,
    seed: RunSeedOption = None,
    val_size: RunValSizeOption = None,
    limit: RunLimitOption = None,
    split: split_option("Split the evaluate stage measures.") = "test",
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
    preflight.refuse_impossible_device(gpu, cpu)
    from mnistsum_cli.data.splitdata import SplitData
    from mnistsum_cli.pipeline import run_pipeline, wanted_config, wanted_prepare_options

    if export:
        from mnistsum_cli.evaluation.onnx_runtime import require_extra

        require_extra("run --export")  # before any stage runs
    prepared, run_dir = SplitData(DataDir(data), mnist_dir), RunDir(artifacts)
    stage_device = functools.cache(lambda: preflight.device(gpu, cpu))  # found when a stage needs it: that loads torch
    if gpu is not None:
        stage_device()  # a --gpu that cannot work is refused before any stage runs
    config, chosen = wanted_config(run_dir, preset_name, {**settings, "seed": seed}, lambda: stage_device().type)
    preflight.notice_if(chosen)
    prepare_options = wanted_prepare_options(prepared, seed, val_size, limit)
    with report.ProgressReporter() as reporter:
        stages = run_pipeline(
            prepare_options, config, split, prepared, run_dir, stage_device, terminal.notice, reporter, force, export
        )
        for stage, skipped, result in stages:
            device_name = str(stage_device()) if stage == "train" and skipped is None else ""
            report.stage_done(stage, skipped, result, prepared.folder, run_dir, device_name, prepare_options.seed)


@app.command(cls=Command, epilog="Example: mnistsum status --json")
def status(
    data: DataOption = DEFAULT_DATA,
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    split: split_option("Split whose evaluation the table shows.") = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON on stdout.")] = False,
) -> None:
    """Show each stage's artifacts: present, up to date or stale, with key figures."""
    from mnistsum_cli.data.splitdata import SplitData
    from mnistsum_cli.pipeline import status as pipeline_status

    stages = pipeline_status(SplitData(DataDir(data)), RunDir(artifacts), split)
    if as_json:
        terminal.print_json([stage.to_dict() for stage in stages])
    else:
        report.status_table(stages)
