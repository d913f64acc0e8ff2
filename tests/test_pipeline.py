"""`status`, `run` staleness, `predict` and the misclassified gallery, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PNG_MAGIC, VAL_SIZE, FakeMnist, assert_one_line_error, snapshot

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch


def states(run_cli) -> dict[str, str]:
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    return {stage["stage"]: stage["state"] for stage in json.loads(out)}


def test_status_of_an_empty_folder(in_tmp: Path, run_cli) -> None:
    assert states(run_cli) == {stage: "missing" for stage in ("prepare", "train", "evaluate", "plot")}
    code, out, err = run_cli("status")
    assert code == 0, err
    assert "missing" in out and "mnistsum prepare" in out


def test_status_follows_the_chain(
    workdir: Path, fake_mnist: FakeMnist, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnistsum_cli.evaluation.evaluate

    assert run_cli("evaluate", "--cpu")[0] == 0
    assert run_cli("plot")[0] == 0
    assert set(states(run_cli).values()) == {"up to date"}

    # evaluating the unchanged model again, later, changes nothing: the plots stay current
    evaluation = workdir / "artifacts" / "evaluation_test.json"
    before = evaluation.read_bytes()
    monkeypatch.setattr(mnistsum_cli.evaluation.evaluate, "now_iso", lambda: "2099-01-01T00:00:00+00:00")
    code, out, err = run_cli("evaluate", "--cpu", "--json")
    assert code == 0, err
    assert evaluation.read_bytes() == before
    assert json.loads(out) == json.loads(before)
    assert set(states(run_cli).values()) == {"up to date"}

    # a new evaluation makes the plots stale
    assert run_cli("evaluate", "--cpu", "--split", "val")[0] == 0
    assert states(run_cli)["plot"] == "stale"

    # a new dataset makes the model and the evaluation stale
    assert run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--seed", 7)[0] == 0
    found = states(run_cli)
    assert found["prepare"] == "up to date"
    assert found["train"] == "stale" and found["evaluate"] == "stale"


def test_run_redoes_only_stale_stages(fake_mnist: FakeMnist, in_tmp: Path, run_cli) -> None:
    args = ["run", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--preset", "cpu", "--cpu", "--epochs", 1]
    assert run_cli(*args)[0] == 0
    data_before = snapshot(in_tmp / "data")
    model_before = (in_tmp / "artifacts" / "model.safetensors").read_bytes()

    code, out, err = run_cli(*args[:-1], 2)  # other settings: train and what follows it rerun
    assert code == 0, err
    assert "prepare: up to date" in out and "train: up to date" not in out
    assert snapshot(in_tmp / "data") == data_before
    assert (in_tmp / "artifacts" / "model.safetensors").read_bytes() != model_before
    assert json.loads((in_tmp / "artifacts" / "history.json").read_text())["config"]["epochs"] == 2

    code, out, err = run_cli(*args[:-1], 2, "--force")
    assert code == 0, err
    assert "up to date" not in out


def test_plot_draws_a_gallery_of_misclassified_rows(workdir: Path, run_cli) -> None:
    assert run_cli("evaluate", "--cpu")[0] == 0
    metrics = json.loads((workdir / "artifacts" / "evaluation_test.json").read_text())
    assert metrics["misclassified_count"] > 0  # one epoch on the fixture leaves mistakes
    for row in metrics["misclassified"]:
        assert row["predicted_digit"] != row["digit"] or row["predicted_sum"] != row["sum"]
    code, out, err = run_cli("plot")
    assert code == 0, err
    gallery = workdir / "artifacts" / "plots" / "misclassified_test.png"
    assert gallery.read_bytes().startswith(PNG_MAGIC) and "misclassified_test.png" in out


def test_predict_a_dataset_row(workdir: Path, run_cli) -> None:
    code, out, err = run_cli("predict", "--index", 3, "--split", "test", "--cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["row"] == 3 and result["true_sum"] == result["true_digit"] + result["number"]
    assert 0 <= result["digit"] <= 9 and 0 <= result["sum"] <= 18
    assert 0 < result["digit_confidence"] <= 1 and 0 < result["sum_confidence"] <= 1


def test_predict_image_files(workdir: Path, fake_mnist: FakeMnist, run_cli) -> None:
    paths = []
    for i in range(2):
        path = workdir / f"digit{i}.png"
        Image.fromarray(255 - fake_mnist.images["test"][i]).resize((112, 112)).save(path)  # dark on light
        paths.append(path)
    code, out, err = run_cli("predict", *paths, "--number", 4, "--cpu", "--json")
    assert code == 0, err
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(p) for p in paths]
    assert all(isinstance(r["digit"], int) and isinstance(r["sum"], int) for r in results)

    code, out, err = run_cli("predict", paths[0], "--number", 4, "--cpu")
    assert code == 0, err
    assert "digit0.png" in out and "confidence" in out


@pytest.mark.parametrize(
    "args",
    [
        ["predict", "--cpu"],  # nothing to predict
        ["predict", "x.png", "--cpu"],  # no --number
        ["predict", "x.png", "--number", 10, "--cpu"],
        ["predict", "x.png", "--number", -1, "--cpu"],
        ["predict", "x.png", "--index", 1, "--number", 1, "--cpu"],
        ["predict", "--index", 10_000, "--cpu"],
    ],
)
def test_predict_bad_usage(workdir: Path, run_cli, args: list) -> None:
    code, out, err = run_cli(*args)
    assert code == 2
    assert_one_line_error(err, out)


def test_predict_unreadable_file_and_missing_model(workdir: Path, in_tmp: Path, run_cli) -> None:
    bad = in_tmp / "notes.png"
    bad.write_text("not an image")
    code, out, err = run_cli("predict", bad, "--number", 1, "--cpu")
    assert code == 1 and "notes.png" in assert_one_line_error(err, out)

    image = in_tmp / "ok.png"
    Image.fromarray(np.eye(28, dtype=np.uint8) * 255).save(image)
    code, out, err = run_cli("predict", image, "--number", 1, "--cpu", "--artifacts", in_tmp / "nowhere")
    assert code == 1 and "mnistsum train" in assert_one_line_error(err, out)


def test_status_reads_each_file_once(workdir: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's header, its hash for the evaluation and for the plots, the splits' header and
    rows: one read each."""
    from mnistsum_cli.store import diskfiles

    assert run_cli("plot")[0] == 0
    reads: dict[str, int] = {}
    real_opened = diskfiles.opened

    def counted(path, *args):
        reads[str(path)] = reads.get(str(path), 0) + 1
        return real_opened(path, *args)

    monkeypatch.setattr(diskfiles, "opened", counted)
    assert set(states(run_cli).values()) == {"up to date"}
    assert {"artifacts/model.safetensors", "artifacts/evaluation_test.json", "data/train.parquet"} <= set(reads)
    assert {path: count for path, count in reads.items() if count > 1} == {}
