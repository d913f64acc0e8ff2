"""`mnistsum runs` and `mnistsum compare`: complete, interrupted and foreign runs in one folder."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from listing_checks import assert_readable
from PIL import Image

from conftest import VAL_SIZE, FakeMnist, _main, assert_one_line_error, snapshot
from mnistsum_cli.data.mnist import MNIST_DIR_ENV
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.training.runlist import (
    CAPTION_WIDTH,
    COLUMNS,
    MAX_COMPARE_NAME,
    RunEntry,
    compare_labels,
    compare_path,
)

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch


@pytest.fixture(scope="module")
def many_runs(fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """artifacts/ holding a run interrupted at epoch 1 of 2, and in previous/ two complete runs
    (the first evaluated on test, the second with another lr), a folder of notes and a damaged run."""
    from mnistsum_cli.cli import report

    root = tmp_path_factory.mktemp("many_runs")
    data, artifacts = root / "data", root / "artifacts"
    common = ("--preset", "cpu", "--cpu", "--data", data, "--artifacts", artifacts)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv(MNIST_DIR_ENV, raising=False)
        assert _main("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--data", data) == 0
        assert _main("train", *common, "--epochs", 1) == 0
        assert _main("evaluate", "--cpu", "--data", data, "--artifacts", artifacts) == 0
        assert _main("train", *common, "--epochs", 1, "--lr", 0.005) == 0

        def end_then_ctrl_c(self, record):
            raise KeyboardInterrupt

        monkeypatch.setattr(report.ProgressReporter, "epoch_end", end_then_ctrl_c)
        assert _main("train", *common, "--epochs", 2) == 130
    (artifacts / "previous" / "notes").mkdir()
    (artifacts / "previous" / "notes" / "todo.txt").write_text("not a run\n")
    (artifacts / "previous" / "damaged").mkdir()
    (artifacts / "previous" / "damaged" / "history.json").write_text("{")
    return root


def rows(run_cli, *args: object) -> list[dict]:
    code, out, err = run_cli("runs", "--artifacts", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_runs_lists_every_folder(many_runs: Path, run_cli) -> None:
    listed = rows(run_cli, many_runs / "artifacts")
    assert len(listed) == 5
    states = sorted(row["state"] for row in listed)
    assert states[:4] == ["complete", "complete", "interrupted at epoch 1 of 2", "not a run (no history.json)"]
    assert states[4].startswith("unreadable: ") and "damaged/history.json is unreadable" in states[4]
    complete = [row for row in listed if row["state"] == "complete"]
    assert len(complete) == 2 and {row["lr"] for row in complete} == {0.01, 0.005}
    first = next(row for row in complete if row["lr"] == 0.01)
    evaluated = json.loads((Path(first["folder"]) / "evaluation_test.json").read_text())
    assert first["test_digit_accuracy"] == evaluated["digit_accuracy"]
    assert first["test_sum_accuracy"] == evaluated["sum_accuracy"]
    assert next(row for row in complete if row["lr"] == 0.005)["test_digit_accuracy"] is None
    interrupted = next(row for row in listed if row["state"].startswith("interrupted"))
    assert interrupted["folder"] == str(many_runs / "artifacts") and interrupted["epochs_done"] == 1
    history = json.loads((many_runs / "artifacts" / "history.json").read_text())
    assert interrupted["val_sum_accuracy"] == history["epochs"][0]["val_sum_accuracy"]
    assert interrupted["train_seconds"] == pytest.approx(history["epochs"][0]["seconds"], abs=0.06)
    for row in complete + [interrupted]:
        assert (row["device"], row["precision"], row["world_size"], row["kept_epoch"]) == ("cpu", "fp32", 1, 1)


def test_runs_table_shows_what_differs_and_captions_the_rest(
    many_runs: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    code, out, err = run_cli("runs", "--artifacts", many_runs / "artifacts")
    assert code == 0 and err == "", err
    header = next(line for line in out.splitlines() if "run id" in line)
    assert {name for name in ("lr", "epochs", "arch", "batch_size") if f" {name} " in header} == {"epochs", "lr"}
    assert "all runs: arch lean" in " ".join(out.split())
    assert "interrupted at epoch 1 of 2" in out and "not a run" in out and "unreadable" in out
    assert "Traceback" not in out + err


TITLE = "runs in artifacts (accuracy in %)"
TABLE_HEADERS = [
    "run id",
    "started",
    "state",
    "epochs",
    "lr",
    "train s",
    "val digit",
    "val sum",
    "test digit",
    "test sum",
]


@pytest.mark.parametrize("terminal", [True, False])
def test_runs_is_readable_at_80_columns_and_piped(
    many_runs: Path, run_cli, monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    """In an 80-column terminal the table fits, no header word split and each run id on one line;
    piped, one line per run however long, its state whole."""
    monkeypatch.chdir(many_runs)  # a short title
    monkeypatch.setenv("COLUMNS", "80")
    if terminal:
        monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: the output is a terminal
    code, out, err = run_cli("runs", "--artifacts", "artifacts")
    assert code == 0 and err == "", err
    listed = [row for row in rows(run_cli, "artifacts") if row["run_id"]]
    ids = [row["run_id"][:8] for row in listed]
    lines = assert_readable(out, TITLE, TABLE_HEADERS, ids, 80 if terminal else None)
    if not terminal:
        header = next(line for line in lines if line.startswith("run id"))
        assert header.split() == [word for name in TABLE_HEADERS for word in name.split()]
        stopped = next(row["run_id"][:8] for row in listed if row["state"].startswith("interrupted"))
        assert any(line.split()[:1] == [stopped] and "interrupted at epoch 1 of 2" in line for line in lines)
        assert len([line for line in lines if line.split()[:1] in ([run] for run in ids)]) == len(ids)
    assert "previous/notes: not a run (no history.json)" in out
    assert "all runs: arch lean" in " ".join(out.split())


def test_runs_in_a_narrow_terminal_is_one_entry_per_run(
    many_runs: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too narrow for the table's longest words: each run an entry of `header value`s, wrapped
    between words."""
    monkeypatch.chdir(many_runs)
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    code, out, err = run_cli("runs", "--artifacts", "artifacts")
    assert code == 0 and err == "", err
    ids = [row["run_id"][:8] for row in rows(run_cli, "artifacts") if row["run_id"]]
    lines = assert_readable(out, TITLE, [], ids, 40)
    assert [line.split()[0] for line in lines if line.split()[:1] in ([run] for run in ids)] == ids
    assert "state interrupted at epoch 1 of 2" in " ".join(out.split())


def test_runs_of_an_empty_folder_says_so(run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("runs", "--artifacts", tmp_path)
    assert (code, out, err) == (0, f"no runs in {tmp_path}\n", "")


def test_runs_csv_has_every_column(many_runs: Path, run_cli) -> None:
    code, out, err = run_cli("runs", "--artifacts", many_runs / "artifacts", "--csv")
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert list(table[0]) == list(COLUMNS) and len(table) == 5
    assert {row["run_id"] for row in table} == {row["run_id"] or "" for row in rows(run_cli, many_runs / "artifacts")}


@pytest.mark.parametrize("key", ["val_sum_accuracy", "lr", "started", "state"])
def test_runs_sort(many_runs: Path, run_cli, key: str) -> None:
    listed = rows(run_cli, many_runs / "artifacts", "--sort", key)
    values = [row[key] for row in listed]
    filled = [value for value in values if value is not None]
    assert filled == sorted(filled) and values[: len(filled)] == filled


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sort", "speed"], "--sort 'speed' is not a column"),
        (["--json", "--csv"], "pass --json or --csv, not both"),
    ],
)
def test_runs_bad_options(many_runs: Path, run_cli, args, message: str) -> None:
    code, out, err = run_cli("runs", "--artifacts", many_runs / "artifacts", *args)
    assert code == 2 and message in assert_one_line_error(err, out)


def test_runs_of_a_missing_folder(run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("runs", "--artifacts", tmp_path / "nowhere")
    assert code == 1 and "not found" in assert_one_line_error(err, out)


def test_compare_by_id_and_by_folder(many_runs: Path, run_cli, tmp_path: Path) -> None:
    artifacts = many_runs / "artifacts"
    listed = [row for row in rows(run_cli, artifacts) if row["run_id"]]
    complete = [row for row in listed if row["state"] == "complete"]
    before = snapshot(artifacts)
    code, out, err = run_cli(
        "compare",
        complete[0]["run_id"][:6],
        complete[1]["folder"],
        "--artifacts",
        artifacts,
        "--out",
        tmp_path / "two.png",
    )
    assert code == 0, err
    with Image.open(tmp_path / "two.png") as image:
        assert image.format == "PNG" and image.width > 1000
    assert snapshot(artifacts) == before

    code, out, err = run_cli("compare", *[row["run_id"] for row in listed], "--artifacts", artifacts)
    assert code == 0, err
    written = artifacts / "compare" / ("-".join(row["run_id"][:8] for row in listed) + ".png")
    assert out.strip() == f"wrote {written}"
    assert written.is_file()
    assert {k: v for k, v in snapshot(artifacts).items() if not k.startswith("compare/")} == before


@pytest.mark.parametrize(
    "name, message", [("ffff", "neither a run folder nor a run id"), ("previous/notes", "holds no readable run")]
)
def test_compare_refuses_what_is_not_a_run(
    many_runs: Path, run_cli, name: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(many_runs / "artifacts")
    code, out, err = run_cli("compare", name, "--artifacts", ".")
    assert code == 1 and message in assert_one_line_error(err, out)
    assert not (many_runs / "artifacts" / "compare" / "ffff.png").exists()


@pytest.mark.parametrize(
    "out, code, message",
    [
        ("model.safetensors", 2, "ending in .png"),  # would have replaced the trained model with a PNG
        ("plots/loss.png", 2, "a file of a run folder"),
        ("notes.png", 1, "exists and is not a PNG"),
        ("nowhere/two.png", 1, "no such folder"),
    ],
)
def test_compare_refuses_an_out_it_must_not_write(
    many_runs: Path, run_cli, tmp_path: Path, out: str, code: int, message: str
) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(many_runs / "artifacts", artifacts)
    (artifacts / "plots").mkdir(exist_ok=True)
    (artifacts / "plots" / "manifest.json").write_text("{}")
    (artifacts / "notes.png").write_text("not a picture\n")
    before = snapshot(artifacts)
    found, listed, error = run_cli("compare", artifacts, "--out", artifacts / out)
    assert found == code and message in assert_one_line_error(error, listed)
    assert snapshot(artifacts) == before


def test_compare_names_many_runs_within_a_file_name() -> None:
    """29 runs of 8-digit ids joined would be 260 bytes, over the 255 a file name may have; a run
    id read from a file cannot lead the name out of compare/."""
    entries = [RunEntry(Path(f"r{index}"), {"run_id": f"{index:08x}" * 2}) for index in range(40)]
    path = compare_path(Path("artifacts"), entries)
    assert path.parent == Path("artifacts/compare") and len(path.name.encode()) <= MAX_COMPARE_NAME + 4
    assert path.name.startswith("00000000-00000001-00000002-00000003-and-36-more-")
    assert compare_path(Path("artifacts"), entries[:39]) != path
    sly = compare_path(Path("artifacts"), [RunEntry(Path("x"), {"run_id": "../../../etc/passwd"})])
    assert sly == Path("artifacts/compare/run.png")


def test_compare_labels_and_caption_are_words() -> None:
    """Issue 23 edge 9: a run that differs in nothing was labelled ' (3148695b)'; the caption was
    field names (`batch_size 128`) and `amp True` on a CPU run, where the precision is fp32."""
    base = {**TrainConfig().to_dict(), "device": "cpu", "precision": "fp32"}
    rows = [
        {**base, "run_id": "3148695b00", "lr": 0.01},
        {**base, "run_id": "77aa01c3d5", "lr": 0.01},
        {**base, "run_id": "954dde2b11", "lr": 0.005, "epochs": 1},
    ]
    labels, caption = compare_labels([RunEntry(Path(row["run_id"]), row) for row in rows])
    assert labels == [
        "10 epochs, peak lr 0.01 (run 3148695b)",
        "10 epochs, peak lr 0.01 (run 77aa01c3)",
        "1 epoch, peak lr 0.005",
    ]
    flat = " ".join(caption.split())
    assert flat.startswith("every run: fastnet network · batches of 1024 · weight decay 0.0005")
    assert "on cpu · fp32 precision" in flat and "amp" not in flat and "_" not in flat
    assert all(len(line) <= CAPTION_WIDTH for line in caption.splitlines())
    same, _ = compare_labels([RunEntry(Path(row["run_id"]), row) for row in rows[:2]])
    assert same == ["run 3148695b", "run 77aa01c3"]


def test_compare_figure_has_a_title_a_legend_in_every_panel_and_axes_from_the_first_point() -> None:
    """Issue 23 edge 9: no title, a legend in the first panel only, val axes from epoch 0."""
    from mnistsum_cli.evaluation.compare import compare_figure

    def history(epochs: int, steps: int) -> dict:
        records = []
        for epoch in range(1, epochs + 1):
            rows = [{"epoch": epoch - 1 + s / steps, "train_loss": 1 / (epoch + s)} for s in range(1, steps + 1)]
            records.append({"epoch": epoch, "val_digit_accuracy": 0.9, "val_sum_accuracy": 0.8, "steps": rows})
        return {"epochs": records}

    figure = compare_figure([history(3, 10), history(2, 10)], ["peak lr 0.01", "peak lr 0.005"], "every run: x")
    try:
        assert figure._suptitle.get_text().startswith("2 runs side by side")
        for axis in figure.axes:
            assert [text.get_text() for text in axis.get_legend().get_texts()] == ["peak lr 0.01", "peak lr 0.005"]
        digit, total, loss = figure.axes
        assert 0.5 < digit.get_xlim()[0] < 1 and 0.5 < total.get_xlim()[0] < 1  # no empty epoch 0
        assert loss.get_xlim()[0] == 0  # the first step is a tenth of an epoch in
        assert figure._supxlabel.get_text() == "every run: x"
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
