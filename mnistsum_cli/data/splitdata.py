"""The prepared data a command works on: the splits in a data folder and the MNIST images they
index, each read and checked at most once per command.

Whether a stage is up to date is decided from the splits' Parquet metadata and the MNIST
files' sizes and times (`header`, `mnist_unchanged`); rows and pixels are read only when a
stage needs them (`dataset`, `mnist`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from mnistsum_cli.data.mnist import Mnist, MnistSource, file_stamps, load_mnist, resolve_source
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.store.paths import SPLITS, DataDir
from mnistsum_cli.store.reads import read_consistently
from mnistsum_cli.store.splits import RERUN, Dataset, open_split, read_dataset


@dataclass(frozen=True)
class DatasetHeader:
    """What the splits' Parquet metadata says, read without their rows."""

    meta: dict[str, Any]  # the train split's, as Dataset.meta
    rows: dict[str, int]

    @property
    def dataset_id(self) -> str:
        return self.meta["dataset_id"]


def read_dataset_header(folder: DataDir) -> DatasetHeader:
    """The metadata and row counts of the three splits, checked to be one `prepare` run's
    (read_dataset checks the rows themselves); one commit's files, as every reader sees them."""
    return read_consistently(folder.root, lambda: _read_header(folder))


def _read_header(folder: DataDir) -> DatasetHeader:
    metas, rows = {}, {}
    for name in SPLITS:
        parquet, metas[name] = open_split(folder, name)
        with parquet:
            rows[name] = parquet.metadata.num_rows
    if len({meta["dataset_id"] for meta in metas.values()}) != 1:
        raise MnistsumError(f"{folder.root} mixes splits of different `prepare` runs: {RERUN}")
    return DatasetHeader(meta=metas["train"], rows=rows)


def check_row(index: int, split: str, rows: int) -> None:
    """Refuse an --index outside the split (of `rows` rows), in one line."""
    if not 0 <= index < rows:
        raise BadOption(f"--index {index}: the {split} split has rows 0-{rows - 1}")


def check_mnist_matches(dataset: Dataset, mnist: Mnist) -> None:
    """Refuse MNIST files other than the ones `prepare` read, and set sizes other than these
    files' (read_split checked each image_index against the recorded sizes: so every row
    points into MNIST)."""
    expected = dataset.meta["mnist_fingerprint"]
    if mnist.fingerprint != expected:
        raise MnistsumError(
            f"MNIST in {mnist.root} (fingerprint {mnist.fingerprint}) is not the MNIST the dataset "
            f"was prepared from ({dataset.meta['mnist_root']}, {expected}): rerun `mnistsum prepare`"
        )
    recorded = dataset.meta["mnist_sizes"]
    if recorded != mnist.sizes:
        raise MnistsumError(
            f"the dataset records MNIST set sizes {recorded}, but MNIST in {mnist.root} has {mnist.sizes}: "
            "rerun `mnistsum prepare`"
        )


class SplitData:
    """The splits in `folder` and the MNIST they index, read on first use and then kept.

    MNIST comes from `mnist` when the caller already has it, else from --mnist-dir
    (`mnist_dir`), else from the folder `prepare` read, else it is downloaded.
    """

    def __init__(self, folder: DataDir, mnist_dir: Optional[Path] = None, mnist: Optional[Mnist] = None) -> None:
        self.folder, self.mnist_dir, self._given_mnist = folder, mnist_dir, mnist

    @cached_property
    def header(self) -> DatasetHeader:
        return read_dataset_header(self.folder)

    @cached_property
    def dataset(self) -> Dataset:
        return read_dataset(self.folder)

    @cached_property
    def mnist_source(self) -> MnistSource:
        try:
            prepared_root: Optional[Path] = Path(self.header.meta["mnist_root"])
        except MnistsumError:
            prepared_root = None
        return resolve_source(self.mnist_dir, prepared_root=prepared_root)

    @cached_property
    def any_mnist(self) -> Mnist:
        """MNIST as found, whether or not the splits were prepared from it (`prepare` needs this)."""
        return self._given_mnist if self._given_mnist is not None else load_mnist(self.mnist_source)

    @cached_property
    def mnist(self) -> Mnist:
        """MNIST, checked to be the files the splits were prepared from."""
        check_mnist_matches(self.dataset, self.any_mnist)
        return self.any_mnist

    def mnist_unchanged(self) -> bool:
        """Whether MNIST is still the one the splits were prepared from: told from the files'
        sizes and times when `prepare` recorded them for this folder, else by reading MNIST."""
        meta = self.header.meta
        source = self.mnist_source
        recorded = meta.get("mnist_files")
        if recorded and str(source.root.resolve()) == meta["mnist_root"] and file_stamps(source) == recorded:
            return True
        return self.any_mnist.fingerprint == meta["mnist_fingerprint"]

    def rewritten(self) -> SplitData:
        """The same folder after `prepare` wrote it: the splits are read afresh, MNIST is kept."""
        return SplitData(self.folder, self.mnist_dir, self.any_mnist)
