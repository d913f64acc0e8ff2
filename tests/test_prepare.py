"""Stage 1: the Parquet splits `prepare` writes."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import VAL_SIZE, FakeMnist, assert_one_line_error, visible
from mnistsum_cli import __version__
from mnistsum_cli.data.mnist import Mnist, load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.paths import SPLITS, DataDir
from mnistsum_cli.store.splits import METADATA_KEY, read_dataset

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

EXPECTED_SCHEMA = pa.schema(
    [
        pa.field("image_index", pa.uint16(), nullable=False),
        pa.field("digit", pa.uint8(), nullable=False),
        pa.field("number", pa.uint8(), nullable=False),
        pa.field("sum", pa.uint8(), nullable=False),
    ]
)
MNIST_SET = {"train": "train", "val": "train", "test": "test"}


@pytest.fixture(scope="module")
def mnist(fake_mnist: FakeMnist) -> Mnist:
    return load_mnist(resolve_source(fake_mnist.root))


def _prepare(mnist: Mnist, out: Path, **options) -> DataDir:
    options.setdefault("val_size", VAL_SIZE)
    data = DataDir(out)
    prepare(mnist, PrepareOptions(**options), data)
    return data


def _tables(data: DataDir) -> dict[str, pa.Table]:
    return {split: pq.read_table(data.split(split)) for split in SPLITS}


def _meta(table: pa.Table) -> dict:
    return json.loads(table.schema.metadata[METADATA_KEY])


def test_writes_three_files_with_narrow_schema(mnist: Mnist, tmp_path: Path) -> None:
    data = _prepare(mnist, tmp_path / "data")
    assert visible(tmp_path / "data") == ["test.parquet", "train.parquet", "val.parquet"]
    for split, table in _tables(data).items():
        schema = table.schema
        assert schema.remove_metadata().equals(EXPECTED_SCHEMA), (split, schema)
        assert schema.names == ["image_index", "digit", "number", "sum"]
        assert METADATA_KEY in schema.metadata
        assert table.num_rows > 0


def test_rows_are_consistent_with_mnist(mnist: Mnist, fake_mnist: FakeMnist, tmp_path: Path) -> None:
    data = _prepare(mnist, tmp_path / "data", seed=3)
    for split, table in _tables(data).items():
        cols = {name: table.column(name).to_numpy() for name in table.schema.names}
        assert (cols["digit"] <= 9).all() and (cols["number"] <= 9).all()
        np.testing.assert_array_equal(cols["sum"].astype(int), cols["digit"].astype(int) + cols["number"].astype(int))
        labels = fake_mnist.labels[MNIST_SET[split]]
        np.testing.assert_array_equal(cols["digit"], labels[cols["image_index"].astype(int)])
        assert len(np.unique(cols["image_index"])) == len(cols["image_index"]), f"{split} repeats images"
        # the numbers are random, not constant
        assert len(np.unique(cols["number"])) > 5


def test_val_and_train_are_disjoint_and_cover_mnist_train(mnist: Mnist, tmp_path: Path) -> None:
    tables = _tables(_prepare(mnist, tmp_path / "data"))
    train = set(tables["train"].column("image_index").to_pylist())
    val = set(tables["val"].column("image_index").to_pylist())
    test = set(tables["test"].column("image_index").to_pylist())
    assert len(val) == VAL_SIZE
    assert not train & val
    assert train | val == set(range(400))
    assert test == set(range(120))


def test_same_seed_gives_identical_rows(mnist: Mnist, tmp_path: Path) -> None:
    first = _tables(_prepare(mnist, tmp_path / "a", seed=7))
    second = _tables(_prepare(mnist, tmp_path / "b", seed=7))
    for split in SPLITS:
        assert first[split].equals(second[split]), split
        assert _meta(first[split])["dataset_id"] == _meta(second[split])["dataset_id"]


def test_other_seed_gives_other_numbers_and_id(mnist: Mnist, tmp_path: Path) -> None:
    first = _tables(_prepare(mnist, tmp_path / "a", seed=0))
    second = _tables(_prepare(mnist, tmp_path / "b", seed=1))
    for split in SPLITS:
        a = first[split].column("number").to_numpy()
        b = second[split].column("number").to_numpy()
        assert len(a) == len(b)
        assert not np.array_equal(a, b), split
    assert _meta(first["train"])["dataset_id"] != _meta(second["train"])["dataset_id"]
    # a different seed also draws a different validation set
    assert set(first["val"].column("image_index").to_pylist()) != set(second["val"].column("image_index").to_pylist())


@pytest.mark.parametrize("limit", [1, 50, 100])
def test_limit_caps_rows(mnist: Mnist, tmp_path: Path, limit: int) -> None:
    tables = _tables(_prepare(mnist, tmp_path / "data", limit=limit))
    expected = {"train": min(limit, 400 - VAL_SIZE), "val": min(limit, VAL_SIZE), "test": min(limit, 120)}
    assert {split: table.num_rows for split, table in tables.items()} == expected
    assert _meta(tables["train"])["limit"] == limit


def test_limit_larger_than_data_keeps_everything(mnist: Mnist, tmp_path: Path) -> None:
    tables = _tables(_prepare(mnist, tmp_path / "data", limit=10_000))
    assert {split: table.num_rows for split, table in tables.items()} == {"train": 320, "val": 80, "test": 120}


@pytest.mark.parametrize("val_size", [400, 401, 100_000])
def test_val_size_too_large_is_an_error(mnist: Mnist, tmp_path: Path, val_size: int) -> None:
    with pytest.raises(MnistsumError, match="val-size"):
        _prepare(mnist, tmp_path / "data", val_size=val_size)
    assert not (tmp_path / "data").exists() or not visible(tmp_path / "data")


@pytest.mark.parametrize("options", [{"val_size": 0}, {"val_size": -5}, {"limit": 0}, {"limit": -1}])
def test_nonsense_options_are_refused(options: dict) -> None:
    with pytest.raises(MnistsumError):
        PrepareOptions(**options)


def test_metadata(mnist: Mnist, tmp_path: Path) -> None:
    tables = _tables(_prepare(mnist, tmp_path / "data", seed=11, limit=60))
    metas = {split: _meta(table) for split, table in tables.items()}
    for split, meta in metas.items():
        assert meta["split"] == split
        assert meta["seed"] == 11
        assert meta["limit"] == 60
        assert meta["val_size"] == VAL_SIZE
        assert meta["mnist_fingerprint"] == mnist.fingerprint
        assert meta["package_version"] == __version__
        assert meta["mnist_sizes"] == {"train": 400, "test": 120}
        assert Path(meta["mnist_root"]) == mnist.root
        created = dt.datetime.fromisoformat(meta["created_at"])
        assert created.tzinfo is not None
        assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 24 * 3600
    for key in ("dataset_id", "created_at", "mnist_fingerprint", "seed"):
        assert len({json.dumps(meta[key]) for meta in metas.values()}) == 1, key
    assert isinstance(metas["train"]["dataset_id"], str) and metas["train"]["dataset_id"]
    # and the package's own reader accepts what prepare wrote
    dataset = read_dataset(DataDir(tmp_path / "data"))
    assert dataset.dataset_id == metas["train"]["dataset_id"]


def test_dataset_id_changes_with_mnist(fake_mnist: FakeMnist, tmp_path: Path) -> None:
    from conftest import write_mnist

    images = {name: array.copy() for name, array in fake_mnist.images.items()}
    images["train"][0, 0, 0] ^= 1
    other = load_mnist(resolve_source(write_mnist(tmp_path / "other", images, fake_mnist.labels).root))
    base = load_mnist(resolve_source(fake_mnist.root))
    a = _meta(_tables(_prepare(base, tmp_path / "a"))["train"])
    b = _meta(_tables(_prepare(other, tmp_path / "b"))["train"])
    assert a["mnist_fingerprint"] != b["mnist_fingerprint"]
    assert a["dataset_id"] != b["dataset_id"]


# --------------------------------------------------------------------------- through the CLI


def test_cli_limit_and_seed(fake_mnist: FakeMnist, in_tmp: Path, run_cli) -> None:
    code, out, err = run_cli(
        "prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--limit", 30, "--seed", 5
    )
    assert code == 0, err
    tables = _tables(DataDir(in_tmp / "data"))
    assert {split: t.num_rows for split, t in tables.items()} == {"train": 30, "val": 30, "test": 30}
    assert _meta(tables["val"])["seed"] == 5
    assert "train.parquet" in out


def test_cli_val_size_too_large(fake_mnist: FakeMnist, in_tmp: Path, run_cli) -> None:
    """A bad option value: a usage error (exit 2), as README says, though MNIST is read first."""
    code, out, err = run_cli("prepare", "--mnist-dir", fake_mnist.root, "--val-size", 400)
    assert code == 2
    line = assert_one_line_error(err, out)
    assert "--val-size" in line
    assert not (in_tmp / "data" / "train.parquet").exists()


def test_prepare_downloads_into_the_data_folder_and_a_failure_leaves_nothing(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import MNIST

    def refuse(self) -> None:
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example/, got:\nno network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(MNIST, "download", refuse)
    code, _, err = run_cli("prepare", "--data", "mydata")
    assert code != 0 and "mydata/MNIST/raw" in err and "no network" in err
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "mydata" / "MNIST").exists()
