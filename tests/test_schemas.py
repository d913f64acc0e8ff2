"""The artifact schemas: what the stages write fits them, damage is one line naming the file,
the field and the stage to rerun, and docs/schemas.md is what they declare."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import pytest

from conftest import VAL_SIZE, FakeMnist
from mnistsum_cli.data.mnist import load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.settings import MAX_SEED, PRESETS, TrainConfig
from mnistsum_cli.store.paths import CHECKPOINT_FORMAT, MODEL_FORMAT, SPLITS, DataDir
from mnistsum_cli.store.schema_docs import markdown
from mnistsum_cli.store.schemas import (
    CHECKPOINT_META,
    EVALUATION,
    HISTORY,
    MODEL_META,
    PLOTS_MANIFEST,
    RUN_SETUP,
    SCHEMAS,
    SETTINGS_RECORD,
    SPLIT_META,
    TRAIN_STATE,
)
from mnistsum_cli.store.splits import METADATA_KEY
from mnistsum_cli.store.tensorfiles import read_safetensors
from mnistsum_cli.store.validation import Schema

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

REPO = Path(__file__).resolve().parents[1]


def test_docs_page_is_generated_from_the_schemas() -> None:
    page = (REPO / "docs" / "schemas.md").read_text()
    assert page == markdown(), (
        "docs/schemas.md is stale: regenerate it with `python -c \"from mnistsum_cli.store.schema_docs import markdown; print(markdown(), end='')\" > docs/schemas.md`"
    )
    for schema in SCHEMAS:
        assert f"## {schema.file_description}" in page


def test_settings_declare_every_train_config_field() -> None:
    assert set(SETTINGS_RECORD.fields) == set(TrainConfig().to_dict())
    for config in PRESETS.values():
        SETTINGS_RECORD.check(config.to_dict(), "config")


# --------------------------------------------------------------------------- what the stages write fits


def test_every_artifact_of_a_run_fits_its_schema(workdir: Path, run_cli) -> None:
    assert run_cli("plot")[0] == 0
    artifacts = workdir / "artifacts"
    for schema, name in (
        (HISTORY, "history.json"),
        (TRAIN_STATE, "train_state.json"),
        (RUN_SETUP, "config.json"),
        (EVALUATION, "evaluation_test.json"),
        (PLOTS_MANIFEST, "plots/manifest.json"),
    ):
        schema.read_json(artifacts / name)
    MODEL_META.check(
        read_safetensors(artifacts / "model.safetensors", "train", MODEL_FORMAT, metadata_only=True)[1], "model"
    )
    CHECKPOINT_META.check(
        read_safetensors(artifacts / "checkpoint.safetensors", "train", CHECKPOINT_FORMAT, metadata_only=True)[1],
        "checkpoint",
    )
    for split in SPLITS:
        SPLIT_META.check(
            json.loads(pq.read_schema(workdir / "data" / f"{split}.parquet").metadata[METADATA_KEY]), split
        )


# --------------------------------------------------------------------------- damage: one line


def _history() -> dict[str, Any]:
    record = {
        f"{split}_{name}": 0.5
        for split in ("train", "val")
        for name in ("digit_loss", "sum_loss", "loss", "digit_accuracy", "sum_accuracy")
    }
    return {
        "run_id": "ab12",
        "dataset_id": "cd34",
        "config": TrainConfig().to_dict(),
        "best_epoch": 1,
        "epochs": [{"epoch": 1, **record}],
    }


def _set(path: str, value: Any) -> Callable[[dict], Any]:
    """An edit of a nested field, path 'a.0.b'; value DELETE removes it."""

    def edit(data: dict) -> Any:
        *parents, last = path.split(".")
        inner = data
        for key in parents:
            inner = inner[int(key)] if isinstance(inner, list) else inner[key]
        key = int(last) if isinstance(inner, list) else last
        if value is DELETE:
            del inner[key]
        else:
            inner[key] = value
        return data

    return edit


DELETE = object()
HISTORY_DAMAGE = {
    "no epoch": (_set("epochs.0.epoch", DELETE), "epochs[0].epoch is missing"),
    "no train_digit_loss": (_set("epochs.0.train_digit_loss", DELETE), "epochs[0].train_digit_loss is missing"),
    "no best_epoch": (_set("best_epoch", DELETE), "best_epoch is missing"),
    "epochs not a list": (_set("epochs", {"1": {}}), "epochs is {'1': {}}, expected a list"),
    "no epochs": (_set("epochs", []), "epochs has 0 entries, expected at least 1"),
    "string value": (_set("epochs.0.val_loss", "0.5"), "epochs[0].val_loss is '0.5', expected a finite number"),
    "bool as an int": (_set("best_epoch", True), "best_epoch is True, expected an integer"),
    "unknown setting": (_set("config.colour", "red"), "config has unknown fields colour"),
    "seed as text": (_set("config.seed", "zero"), f"config.seed is 'zero', expected an integer 0-{MAX_SEED}"),
    "top-level array": (lambda data: [data], "holds a list, expected an object"),
}


@pytest.mark.parametrize("damage", HISTORY_DAMAGE, ids=list(HISTORY_DAMAGE))
def test_damage_is_one_line_naming_file_field_and_stage(damage: str) -> None:
    edit, problem = HISTORY_DAMAGE[damage]
    HISTORY.check(_history(), "artifacts/history.json")
    with pytest.raises(MnistsumError) as error:
        HISTORY.check(edit(copy.deepcopy(_history())), "artifacts/history.json")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("artifacts/history.json")
    assert problem in message
    assert message.endswith("rerun `mnistsum train`")


def test_fields_not_declared_are_accepted() -> None:
    """A newer version may add fields: a reader ignores them (except in the settings)."""
    HISTORY.check({**_history(), "notes": "from the future"}, "history.json")


def test_numbers_take_integers_a_float_can_hold() -> None:
    history = _history()
    history["epochs"][0].update(train_loss=1, val_loss=10**300)
    HISTORY.check(history, "history.json")
    history["epochs"][0]["val_loss"] = 10**400  # float() of it raises OverflowError
    with pytest.raises(MnistsumError, match=r"epochs\[0\]\.val_loss is 1000.*\.\.\., expected a finite number >= 0"):
        HISTORY.check(history, "history.json")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_numbers_are_finite(value: float) -> None:
    """JSON has no NaN: no writer of this package writes one (a run stops at a NaN loss), so one
    in a file is damage, refused before it reaches torch or a plot."""
    history = _history()
    history["epochs"][0]["val_loss"] = value
    with pytest.raises(MnistsumError, match=rf"epochs\[0\]\.val_loss is {value}, expected a finite number >= 0"):
        HISTORY.check(history, "history.json")


@pytest.mark.parametrize(
    "schema, data, problem",
    [
        (SPLIT_META, {"split": "train", "dataset_id": "a", "seed": "zero"}, "seed is 'zero'"),
        (SPLIT_META, {"split": "train", "dataset_id": "a", "seed": -1}, "seed is -1"),
        (TRAIN_STATE, [], "holds a list"),
        (EVALUATION, {"model": None}, "split is missing"),
        (HISTORY, {**_history(), "best_epoch": 2}, "does not satisfy best_epoch <= the number of epochs"),
        (
            TRAIN_STATE,
            {"run_id": "a", "dataset_id": "b", "config": {}, "epoch": 1, "best_epoch": 2},
            "best_epoch <= epoch",
        ),
    ],
)
def test_each_schema_names_its_stage(schema: Schema, data: Any, problem: str) -> None:
    with pytest.raises(MnistsumError, match=f"{problem}.*rerun `mnistsum {schema.stage}`"):
        schema.check(data, schema.file_description)


def test_split_metadata_of_the_fake_mnist_fits(fake_mnist: FakeMnist, tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    prepare(load_mnist(resolve_source(fake_mnist.root)), PrepareOptions(seed=MAX_SEED, val_size=VAL_SIZE), data)
    meta = json.loads(pq.read_schema(data.split("val")).metadata[METADATA_KEY])
    assert SPLIT_META.check(meta, "val")["seed"] == MAX_SEED
