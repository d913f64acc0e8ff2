"""Stage 1: draw the random numbers and the validation split, write Parquet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy loads where it is used: the CLI starts without it
    import numpy as np

from mnistsum_cli import __version__
from mnistsum_cli.data.mnist import Mnist
from mnistsum_cli.errors import BadOption
from mnistsum_cli.store.fingerprints import dataset_fingerprint, now_iso
from mnistsum_cli.store.paths import MNIST_SET_OF_SPLIT, SPLITS, DataDir
from mnistsum_cli.store.splits import split_bytes
from mnistsum_cli.store.transactions import commit

DEFAULT_VAL_SIZE = 5000


@dataclass(frozen=True)
class PrepareOptions:
    seed: int = 0
    val_size: int = DEFAULT_VAL_SIZE
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.val_size < 1:
            raise BadOption(f"val size {self.val_size}: must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise BadOption(f"limit {self.limit}: must be at least 1")

    def matches(self, meta: dict) -> bool:
        """Whether a dataset's metadata records these options."""
        return (meta.get("seed"), meta.get("val_size"), meta.get("limit")) == (self.seed, self.val_size, self.limit)


def build_splits(mnist: Mnist, options: PrepareOptions) -> dict[str, dict[str, np.ndarray]]:
    """Rows of each split: image_index, digit, number, sum; a pure function of MNIST and options."""
    import numpy as np

    n_train = mnist.sizes["train"]
    if options.val_size >= n_train:
        raise BadOption(f"--val-size {options.val_size} leaves no training images: MNIST train has {n_train}")
    rng = np.random.default_rng(options.seed)
    train_order = rng.permutation(n_train)
    indices = {
        "train": train_order[options.val_size :],
        "val": train_order[: options.val_size],
        "test": rng.permutation(mnist.sizes["test"]),
    }
    columns = {}
    for split in SPLITS:
        index = np.sort(indices[split][: options.limit])
        digit = mnist.labels[MNIST_SET_OF_SPLIT[split]][index].astype(np.uint8)
        number = rng.integers(0, 10, size=len(index), dtype=np.uint8)
        columns[split] = {
            "image_index": index.astype(np.uint16),
            "digit": digit,
            "number": number,
            "sum": digit + number,
        }
    return columns


def prepare(mnist: Mnist, options: PrepareOptions, out: DataDir) -> dict[str, dict[str, np.ndarray]]:
    """Build the splits and write them in one commit of the data folder (all three or none);
    every file records the same dataset id."""
    columns = build_splits(mnist, options)
    dataset_id = dataset_fingerprint(columns, mnist.fingerprint)
    created_at = now_iso()
    with commit(out.root, "prepare", "--data") as change:
        for split in SPLITS:
            meta = {
                "split": split,
                "dataset_id": dataset_id,
                "seed": options.seed,
                "val_size": options.val_size,
                "limit": options.limit,
                "mnist_root": str(mnist.root),
                "mnist_fingerprint": mnist.fingerprint,
                "mnist_files": mnist.stamps,
                "mnist_sizes": mnist.sizes,
                "package_version": __version__,
                "created_at": created_at,
            }
            change.write(out.split(split), split_bytes(columns[split], meta))
    return columns
