"""Stage 4 and the training progress display."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import pytest
from matplotlib.colors import LogNorm
from rich.console import Console

from conftest import assert_one_line_error, leftovers, snapshot
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.evaluation.figures import curves, gallery, heatmap, incomplete_note
from mnistsum_cli.evaluation.plot import plot
from mnistsum_cli.pipeline import CURRENT, STALE
from mnistsum_cli.store.paths import DataDir, RunDir

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch


def history(epochs_done: int, planned: int) -> dict:
    records = [
        {
            "epoch": e,
            **{
                f"{split}_{key}": value
                for split in ("train", "val")
                for key, value in (("digit_accuracy", 0.5 + 0.05 * e), ("sum_accuracy", 0.1 * e))
            },
        }
        for e in range(1, epochs_done + 1)
    ]
    return {"epochs": records, "best_epoch": epochs_done, "config": {"epochs": planned}}


# --------------------------------------------------------------------------- all or nothing


def test_plot_with_a_stale_evaluation_changes_nothing(workdir: Path, run_cli) -> None:
    artifacts = workdir / "artifacts"
    assert run_cli("plot")[0] == 0
    before = snapshot(artifacts)
    evaluation = artifacts / "evaluation_test.json"
    metrics = json.loads(evaluation.read_text())
    metrics["model"]["sha256"] = "0" * 16  # evaluates another model
    evaluation.write_text(json.dumps(metrics))
    (artifacts / "history.json").write_text((artifacts / "history.json").read_text() + " ")  # new curves to draw

    code, out, err = run_cli("plot")
    assert code == 1
    assert "mnistsum evaluate" in assert_one_line_error(err, out)
    after = snapshot(artifacts)
    assert {k: v for k, v in after.items() if k.startswith("plots")} == {
        k: v for k, v in before.items() if k.startswith("plots")
    }
    assert not leftovers(artifacts)


def test_a_failure_while_writing_keeps_the_old_plots(workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import mnistsum_cli.evaluation.plot

    artifacts = workdir / "artifacts"
    assert run_cli("plot")[0] == 0
    before = snapshot(artifacts / "plots")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mnistsum_cli.evaluation.plot, "json_bytes", disk_full)  # the manifest, written last
    with pytest.raises(MnistsumError, match=f"cannot write {artifacts}/: No space left on device; nothing was changed"):
        plot(RunDir(artifacts), prepared=SplitData(DataDir(workdir / "data")))
    assert snapshot(artifacts / "plots") == before
    assert not leftovers(artifacts)


def test_plots_are_published_with_their_manifest(workdir: Path, run_cli) -> None:
    code, out, err = run_cli("plot")
    assert code == 0, err
    plots = workdir / "artifacts" / "plots"
    manifest = json.loads((plots / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(path.name for path in plots.iterdir() if path.name != "manifest.json")
    assert "misclassified_test.png" in manifest["files"]
    assert not leftovers(workdir / "artifacts")


# --------------------------------------------------------------------------- readable figures


def test_curves_of_an_incomplete_run_say_so() -> None:
    assert incomplete_note(history(3, 10)) == " (incomplete: 3 of 10 epochs)"
    assert incomplete_note(history(10, 10)) == ""
    figure = curves(history(3, 10), [("digit_accuracy", "digit head")], "accuracy (%)", "Accuracy", "", scale=100)
    assert figure._suptitle.get_text() == "Accuracy (incomplete: 3 of 10 epochs)"


def test_accuracy_panels_share_one_y_range() -> None:
    panels = [("digit_accuracy", "digit head"), ("sum_accuracy", "sum head")]
    figure = curves(history(4, 4), panels, "accuracy (%)", "Accuracy", "", scale=100, share_y=True)
    left, right = figure.axes[:2]
    assert left.get_ylim() == right.get_ylim()
    assert left.get_ylim()[0] <= 10 and left.get_ylim()[1] >= 70  # covers both heads' values


def test_confusion_colour_bar_is_in_counts() -> None:
    matrix = [[900, 3, 0], [12, 450, 1], [0, 0, 2000]]
    figure = heatmap(matrix, "digit confusion")
    image, bar_axis = figure.axes[0].images[0], figure.axes[1]
    assert isinstance(image.norm, LogNorm)
    figure.canvas.draw()
    assert bar_axis.get_ylabel() == "rows (log scale)"
    labels = {label.get_text() for label in bar_axis.get_yticklabels()}
    assert {"1", "10", "100", "1,000"} <= labels, labels


def test_gallery_colours_each_head_by_its_own_answer() -> None:
    """Issue 23 edge 2: the sum head is its own head, so a row can have a wrong digit and a right
    sum (or the other way round): each head's caption is red exactly where that head is wrong,
    and the legend says so."""
    import numpy as np
    from matplotlib.colors import same_color

    examples = [
        {"number": 3, "digit": 4, "predicted_digit": 4, "sum": 7, "predicted_sum": 8},  # sum head wrong
        {"number": 2, "digit": 3, "predicted_digit": 5, "sum": 5, "predicted_sum": 5},  # digit head wrong
    ]
    figure = gallery(examples, np.zeros((2, 28, 28), np.uint8), "title")
    captions = [(axis.title, axis.xaxis.label) for axis in figure.axes[:2]]
    assert [(digit.get_text(), total.get_text()) for digit, total in captions] == [
        ("+3: digit 4→4", "sum 7→8"),
        ("+2: digit 3→5", "sum 5→5"),
    ]
    wrong = [[not same_color(text.get_color(), "black") for text in pair] for pair in captions]
    assert wrong == [[False, True], [True, False]]
    legend = figure._supxlabel.get_text()
    assert "digit head" in legend and "sum head" in legend and "red where that head is wrong" in legend


def test_accuracy_legends_sit_in_one_place_and_every_lr_strip_has_numbers() -> None:
    """Issue 23 edge 9: with shared y axes matplotlib hid the second lr strip's tick labels, and
    `best` placed each legend where its own panel had room."""
    panels = [("digit_accuracy", "digit head"), ("sum_accuracy", "sum head")]
    figure = curves(with_steps(40, 3), panels, "accuracy (%)", "Accuracy", "", scale=100, share_y=True, zoom=True)
    figure.canvas.draw()
    top, strips = figure.axes[:2], figure.axes[2:]
    places = {axis.get_legend()._loc for axis in top}
    assert len(places) == 1 and 0 not in places  # 0 is `best`: wherever the curves leave room
    for strip in strips:
        assert [label.get_text() for label in strip.get_yticklabels() if label.get_visible() and label.get_text()]


# --------------------------------------------------------------------------- progress


def test_progress_shows_the_run_line_eta_and_images_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    from mnistsum_cli.cli import report

    screen = io.StringIO()
    monkeypatch.setattr(report, "console", Console(file=screen, width=200, force_terminal=False))
    with report.ProgressReporter() as reporter:
        reporter.epoch_start(2, 3, steps=10, batch_size=64)  # a resumed run: epoch 1 was done before
        for _ in range(4):
            reporter.step()
        table = Console(width=200, record=True, file=io.StringIO())
        table.print(reporter.progress.make_tasks_table(reporter.progress.tasks))
        text = table.export_text()
        run_line, epoch_line = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
        assert "epoch 2 of 3" in run_line and "1/3 epochs done" in run_line
        assert "elapsed" in run_line and "remaining" in run_line
        assert "4/10 steps" in epoch_line and "img/s" in epoch_line and "remaining" in epoch_line
        record = {
            "epoch": 2,
            **{f"{s}_{k}": 0.5 for s in ("train", "val") for k in ("loss", "digit_accuracy", "sum_accuracy")},
        }
        reporter.epoch_end({**record, "seconds": 1.0})
        assert "epoch 2/3" in screen.getvalue()
        assert len(reporter.progress.tasks) == 1  # the run line stays for epoch 3


# --------------------------------------------------------------------------- damaged inputs: one line


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _set(*keys, value=None):
    """An edit that sets (value given) or removes (no value) the field at keys; returns the document."""

    def edit(document):
        inner = document
        for key in keys[:-1]:
            inner = inner[key]
        if value is None:
            del inner[keys[-1]]
        else:
            inner[keys[-1]] = value
        return document

    return edit


HISTORY_DAMAGE = {
    "no epoch": _set("epochs", 0, "epoch"),
    "no train_digit_loss": _set("epochs", 0, "train_digit_loss"),
    "no best_epoch": _set("best_epoch"),
    "epochs not a list": _set("epochs", value={"1": {}}),
    "string values": _set("epochs", 0, "val_sum_accuracy", value="0.9"),
    "top-level array": lambda history: [history],
}


@pytest.mark.parametrize("damage", HISTORY_DAMAGE, ids=list(HISTORY_DAMAGE))
def test_plot_on_a_damaged_history(workdir: Path, run_cli, damage: str) -> None:
    artifacts = workdir / "artifacts"
    _edit_json(artifacts / "history.json", HISTORY_DAMAGE[damage])
    code, out, err = run_cli("plot")
    assert code == 1
    line = assert_one_line_error(err, out)
    assert "history.json" in line and "rerun `mnistsum train`" in line
    assert not (artifacts / "plots").exists()


EVALUATION_DAMAGE = {
    "no digit_confusion": (_set("digit_confusion"), "digit_confusion is missing"),
    "ragged confusion": (_set("digit_confusion", 3, value=[0] * 9), "digit_confusion[3] has 9 entries, expected 10"),
    "model null": (lambda metrics: {**metrics, "model": None}, "model is None, expected an object"),
    "image_index past MNIST": (
        _set("misclassified", 0, "image_index", value=60_000),
        "image_index 60000 is outside the MNIST test set",
    ),
}


@pytest.mark.parametrize("damage", EVALUATION_DAMAGE, ids=list(EVALUATION_DAMAGE))
def test_plot_on_a_damaged_evaluation(workdir: Path, run_cli, damage: str) -> None:
    artifacts = workdir / "artifacts"
    edit, problem = EVALUATION_DAMAGE[damage]
    assert json.loads((artifacts / "evaluation_test.json").read_text())["misclassified"], (
        "the gallery case needs a wrong row"
    )
    _edit_json(artifacts / "evaluation_test.json", edit)
    code, out, err = run_cli("plot")
    assert code == 1
    line = assert_one_line_error(err, out)
    assert "evaluation_test.json" in line and problem in line and "mnistsum evaluate" in line
    assert not (artifacts / "plots").exists()


# --------------------------------------------------------------------------- per-step curves


def with_steps(steps_per_epoch: int, epochs: int) -> dict:
    """history(): plus per-step records whose train accuracy climbs through each epoch."""
    result = history(epochs, epochs)
    for record in result["epochs"]:
        e = record["epoch"]
        record["val_digit_loss"] = record["val_sum_loss"] = record["val_loss"] = 1.0 / e
        record["steps"] = [
            {
                "step": (e - 1) * steps_per_epoch + s,
                "epoch": e - 1 + s / steps_per_epoch,
                "lr": 0.01 * s / steps_per_epoch,
                "train_digit_accuracy": 0.4 + 0.1 * e + 0.001 * s,
                "train_sum_accuracy": 0.1 * e,
            }
            for s in range(1, steps_per_epoch + 1)
        ]
    return result


def test_curves_draw_every_step_val_per_epoch_and_the_lr() -> None:
    figure = curves(
        with_steps(40, 3), [("digit_accuracy", "digit head")], "accuracy (%)", "Accuracy", "arch lean", scale=100
    )
    axis, lr_axis = figure.axes[:2]
    raw, smooth, val = (
        line
        for line in axis.get_lines()
        if line.get_label() in ("train, per step", "train, smoothed", "val (end of epoch)")
    )
    assert len(raw.get_xdata()) == len(smooth.get_xdata()) == 120
    assert raw.get_xdata()[0] == pytest.approx(1 / 40) and raw.get_xdata()[-1] == 3.0
    assert list(val.get_xdata()) == [1, 2, 3] and list(val.get_ydata()) == pytest.approx([55, 60, 65])
    assert max(lr_axis.get_lines()[0].get_ydata()) == pytest.approx(0.01)
    assert figure._supxlabel.get_text() == "arch lean"


def test_old_history_without_steps_still_plots(workdir: Path, run_cli) -> None:
    path = workdir / "artifacts" / "history.json"
    old = json.loads(path.read_text())
    for record in old["epochs"]:
        del record["steps"]
    path.write_text(json.dumps(old))
    code, out, err = run_cli("plot")
    assert code == 0, err
    assert (workdir / "artifacts" / "plots" / "loss.png").is_file()


def test_plots_go_stale_when_a_step_record_changes(workdir: Path, run_cli) -> None:
    assert run_cli("plot")[0] == 0
    plot_state = lambda: next(s for s in json.loads(run_cli("status", "--json")[1]) if s["stage"] == "plot")["state"]  # noqa: E731
    assert plot_state() == CURRENT
    path = workdir / "artifacts" / "history.json"
    changed = json.loads(path.read_text())
    changed["epochs"][0]["steps"][0]["train_loss"] += 1.0
    path.write_text(json.dumps(changed, indent=2) + "\n")
    assert plot_state() == STALE
