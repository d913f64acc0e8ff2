"""Everything the CLI draws on screen with rich: summaries, tables, the training progress bar."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from mnistsum_cli.store.paths import DataDir, RunDir
from mnistsum_cli.terminal import console, percent, printable

if TYPE_CHECKING:  # imported for annotations only: they pull in numpy, torch and matplotlib
    import numpy as np

    from mnistsum_cli.pipeline import StageStatus
    from mnistsum_cli.training.run import Run


# --------------------------------------------------------------------------- prepare


def prepare_summary(columns: Mapping[str, Mapping[str, np.ndarray]], folder: DataDir, seed: int) -> None:
    table = Table(title=f"mnistsum prepare (seed {seed})")
    table.add_column("split")
    table.add_column("rows", justify="right")
    table.add_column("digits 0-9", justify="left")
    table.add_column("numbers 0-9", justify="left")
    table.add_column("sums 0-18", justify="left")
    for split, cols in columns.items():
        table.add_row(
            split,
            f"{len(cols['digit']):,}",
            histogram(cols["digit"], 10),
            histogram(cols["number"], 10),
            histogram(cols["sum"], 19),
        )
    console.print(table)
    written([folder.split(split) for split in columns])


def histogram(values: np.ndarray, bins: int) -> str:
    """A one-line bar chart of the counts of 0..bins-1 (in ASCII where stdout is not Unicode)."""
    import numpy as np

    counts = np.bincount(values.astype(np.int64), minlength=bins)
    blocks = " ▁▂▃▄▅▆▇█" if console.encoding.startswith("utf") else " .:-=+*#@"
    top = counts.max() or 1
    return "".join(blocks[int(round(8 * count / top))] for count in counts)


# --------------------------------------------------------------------------- train


class ImagesPerSecond(ProgressColumn):
    """Images per second of a task whose steps are batches of task.fields["batch_size"] images."""

    def render(self, task: Task) -> Text:
        batch_size = task.fields.get("batch_size")
        if not batch_size:
            return Text("")
        speed = task.speed
        return Text("… img/s" if speed is None else f"{speed * batch_size:,.0f} img/s")


class ProgressReporter:
    """While training: a run line (epoch k of n, elapsed, remaining) over a bar of the epoch's
    steps (images/s, elapsed, remaining); after each epoch a one-line summary of it."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.epochs = 0
        self.steps = 0

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def epoch_start(self, epoch: int, epochs: int, steps: int, batch_size: int) -> None:
        self.epochs, self.steps = epochs, steps
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                ImagesPerSecond(),
                TimeElapsedColumn(),
                TextColumn("elapsed,"),
                TimeRemainingColumn(),
                TextColumn("remaining"),
                console=console,
                transient=True,
            )
            self.run_task = self.progress.add_task("", total=epochs, completed=epoch - 1, unit="epochs done")
            self.progress.start()
        self.progress.update(self.run_task, description=f"[bold]epoch {epoch} of {epochs}[/]")
        self.epoch_task = self.progress.add_task("  steps", total=steps, unit="steps", batch_size=batch_size)

    def step(self) -> None:
        self.progress.advance(self.epoch_task)
        self.progress.advance(self.run_task, 1 / self.steps)

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.progress.remove_task(self.epoch_task)
        self.progress.update(self.run_task, completed=record["epoch"])
        self.progress.console.print(epoch_line(record, self.epochs), soft_wrap=True)
        if record["epoch"] == self.epochs:
            self.stop()


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}  "
        f"train loss {record['train_loss']:.4f} digit {percent(record['train_digit_accuracy'])} "
        f"sum {percent(record['train_sum_accuracy'])}  |  "
        f"val loss {record['val_loss']:.4f} digit {percent(record['val_digit_accuracy'])} "
        f"sum {percent(record['val_sum_accuracy'])}  ({record['seconds']:.1f} s)"
    )


def train_summary(run: Run, device: str) -> None:
    """What `train` (and `run`'s train stage) says: the epochs this call trained (after --resume,
    not the ones saved before), its timings and the epoch kept."""
    from mnistsum_cli.training.run import epoch_count

    best = run.kept_record
    resumed = f" (epochs {run.begun_at + 1}-{run.epoch} of {run.config.epochs}, resumed)" if run.begun_at else ""
    console.print(
        f"trained {epoch_count(run.trained_now)}{resumed} on {device}: training loop {run.train_seconds:.1f} s, "
        f"data load {run.load_seconds:.1f} s; kept epoch {run.best_epoch} "
        f"(val digit {percent(best['val_digit_accuracy'])}, val sum {percent(best['val_sum_accuracy'])})",
        soft_wrap=True,
    )
    written([run.folder.model, run.folder.history, run.folder.setup_file, run.folder.checkpoint])


def run_complete(folder: RunDir, epochs: int) -> None:
    """What `train --resume` says when the run has nothing left to do."""
    console.print(
        f"the run in {escape(printable(str(folder.root)))} is complete ({epochs} of {epochs} epochs): nothing was done; "
        "`mnistsum train` without --resume starts a new run",
        soft_wrap=True,
    )


# --------------------------------------------------------------------------- evaluate


def evaluation_summary(metrics: dict[str, Any], path: Path) -> None:
    table = Table(title=f"mnistsum evaluate: {metrics['split']} split, {metrics['rows']:,} rows")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("digit accuracy", percent(metrics["digit_accuracy"]))
    table.add_row("sum accuracy", percent(metrics["sum_accuracy"]))
    table.add_row("digit loss", f"{metrics['digit_loss']:.4f}")
    table.add_row("sum loss", f"{metrics['sum_loss']:.4f}")
    table.add_row("consistency (sum = digit + number)", percent(metrics["consistency"]))
    table.add_row("rows with a wrong digit or sum", f"{metrics['misclassified_count']:,}")
    console.print(table)

    per_digit = Table(title="per-digit accuracy (%)")
    for digit in metrics["per_digit_accuracy"]:
        per_digit.add_column(digit, justify="right")
    per_digit.add_row(*(f"{100 * v:.1f}" for v in metrics["per_digit_accuracy"].values()))
    console.print(per_digit)
    console.print(confusion_table("digit confusion (rows: true, columns: predicted)", metrics["digit_confusion"]))
    console.print(f"wrote {escape(printable(str(path)))}")


def confusion_table(title: str, matrix: list[list[int]]) -> Table:
    table = Table(title=title)
    table.add_column("")
    for column in range(len(matrix)):
        table.add_column(str(column), justify="right")
    for row, counts in enumerate(matrix):
        cells = [
            f"[bold]{count}[/]" if row == col else (str(count) if count else "[dim]·[/]")
            for col, count in enumerate(counts)
        ]
        table.add_row(str(row), *cells)
    return table


def written(paths: list[Path]) -> None:
    for path in paths:
        console.print(f"wrote {escape(printable(str(path)))}", soft_wrap=True)


def export_summary(exported: Any) -> None:
    """What `mnistsum export` prints: the agreement check it passed and the file written."""
    meta = exported.meta
    console.print(f"onnxruntime agrees with torch on {escape(meta['check'])}", soft_wrap=True)
    console.print(
        f"wrote {escape(printable(str(exported.path)))} ({exported.size / 1e6:.1f} MB, opset {exported.opset}; "
        f"run {meta['run_id']}, {meta['arch']}, model {meta['model_sha256']})",
        soft_wrap=True,
    )


# --------------------------------------------------------------------------- predict


def predictions_table(results: list[dict[str, Any]]) -> None:
    table = Table(title="mnistsum predict", caption=f"answered by {results[0]['runtime']}")
    source = "image" if "image" in results[0] else "row"
    for column in (source, "number", "digit", "confidence", "sum", "confidence"):
        table.add_column(column, justify="left" if column == source else "right")
    for result in results:
        where = result["image"] if source == "image" else f"{result['split']} row {result['row']}"
        digit, total = str(result["digit"]), str(result["sum"])
        if "true_digit" in result:
            digit += f" (true {result['true_digit']})"
            total += f" (true {result['true_sum']})"
        table.add_row(
            escape(printable(where)),
            str(result["number"]),
            digit,
            percent(result["digit_confidence"]),
            total,
            percent(result["sum_confidence"]),
        )
    console.print(table)


# --------------------------------------------------------------------------- run and status


def stage_done(
    stage: str, skipped: StageStatus | None, result: Any, data: DataDir, artifacts: RunDir, device: str, seed: int
) -> None:
    """What `mnistsum run` prints after each stage."""
    if skipped is not None:
        console.print(f"[green]✓[/] {stage}: up to date ({escape(skipped.detail)}), skipped", soft_wrap=True)
        return
    console.rule(stage)
    if stage == "prepare":
        prepare_summary(result, data, seed)
    elif stage == "train":
        train_summary(result, device)
    elif stage == "evaluate":
        evaluation_summary(result, artifacts.evaluation(result["split"]))
    elif stage == "export":
        export_summary(result)
    else:
        written(result)


def status_table(stages: list[StageStatus]) -> None:
    from mnistsum_cli.pipeline import CURRENT, INCOMPLETE, STALE

    styles = {CURRENT: "green", STALE: "yellow", INCOMPLETE: "yellow"}
    table = Table(title="mnistsum status")
    for column in ("stage", "state", "detail", "figures"):
        table.add_column(column)
    for stage in stages:
        style = styles.get(stage.state, "red")
        table.add_row(
            stage.stage,
            f"[{style}]{stage.state}[/]",
            escape(printable(stage.detail)),
            escape(figures_text(stage.figures)),
        )
    console.print(table)


def figures_text(figures: dict[str, Any]) -> str:
    parts = []
    for key, value in figures.items():
        if isinstance(value, float):
            value = percent(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v:,}" for k, v in value.items())
        parts.append(f"{key.replace('_', ' ')}: {value}")
    return "\n".join(parts)
