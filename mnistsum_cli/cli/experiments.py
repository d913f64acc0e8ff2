"""The commands over many training runs: `sweep` searches settings with Optuna (a run folder per
trial), `runs` lists the runs in an artifacts folder, `compare` draws runs side by side."""

from pathlib import Path
from typing import Annotated, List, Literal, Optional

import typer

from mnistsum_cli import terminal
from mnistsum_cli.cli import report
from mnistsum_cli.cli.commands import Command, app
from mnistsum_cli.cli.options import DEVICE_PANEL, ArtifactsOption, CpuOption, DataOption, MnistDirOption, PresetOption
from mnistsum_cli.errors import BadOption
from mnistsum_cli.settings import MAX_SEED
from mnistsum_cli.store.paths import DEFAULT_ARTIFACTS, DEFAULT_DATA


@app.command(
    cls=Command,
    epilog="Examples: mnistsum sweep --trials 20 --jobs 2 --cpu · mnistsum sweep --show · "
    "mnistsum sweep --storage postgresql+psycopg://user@host/db --study s1  (on each machine)",
)
def sweep(
    study: Annotated[
        str, typer.Option("--study", metavar="NAME", help="Study name: its folder is <artifacts>/sweeps/NAME.")
    ] = "sweep",
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
            metavar="IDS",
            help="GPUs to use, e.g. 0,1: one trial per GPU at a time.",
            show_default=False,
            rich_help_panel=DEVICE_PANEL,
        ),
    ] = None,
    storage: Annotated[
        Optional[str],
        typer.Option(
            "--storage",
            metavar="URL",
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
    from mnistsum_cli.cli import listings
    from mnistsum_cli.sweep.study import check_installed, show_study, start_sweep

    check_installed()
    if as_json and as_csv:
        raise BadOption("pass --json or --csv, not both")
    if (as_json or as_csv) and not show:
        raise BadOption("--json and --csv go with --show")
    if show:
        shown = show_study(study, storage, artifacts)
        if as_json:
            terminal.print_json(shown.rows)
        elif as_csv:
            typer.echo(shown.as_csv(), nl=False)
        else:
            listings.sweep_table(shown)
        return
    plots = start_sweep(
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
    report.written(plots)


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
        str, typer.Option("--sort", metavar="COLUMN", help="Column to sort by, e.g. started, val_sum_accuracy, arch.")
    ] = "started",
) -> None:
    """List the training runs in --artifacts: the current one and each kept in previous/.

    One row per run: short id, start, state (complete, or interrupted at epoch k of n), the settings that differ between the runs (the others, and the device when the same for all, in the caption), training seconds, val and test accuracy; folders that hold no run below. Readable at 80 columns; piped, one line per run. --json and --csv print every column.
    """
    from mnistsum_cli.cli import listings
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
        listings.runs_table(entries, *differing_settings(entries), artifacts)


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
    from mnistsum_cli.evaluation.compare import compare_runs

    histories = [{"epochs": entry.run.history} for entry in entries]  # what compare_runs reads of history.json
    report.written([compare_runs(histories, labels, caption, path)])
