"""Reading MNIST through torchvision: where it lives, downloading, fingerprinting."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy loads where it is used: the CLI starts without it
    import numpy as np

from mnistsum_cli.errors import MnistsumError, first_line
from mnistsum_cli.store.fingerprints import fingerprint_arrays

MNIST_DIR_ENV = "MNISTSUM_MNIST_DIR"
DEFAULT_MNIST_ROOT = Path("data")
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class MnistSource:
    """Where to read MNIST from, and whether torchvision may download it there."""

    root: Path
    download: bool

    @property
    def raw_dir(self) -> Path:
        return self.root / "MNIST" / "raw"


@dataclass(frozen=True)
class Mnist:
    """MNIST train and test sets as uint8 images [N, 28, 28] and int64 labels [N]."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    root: Path
    fingerprint: str
    stamps: dict[str, list[int]] = field(default_factory=dict)  # file_stamps() of the files read

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(labels) for name, labels in self.labels.items()}


def resolve_source(
    mnist_dir: Path | None = None, default_root: Path = DEFAULT_MNIST_ROOT, prepared_root: Path | None = None
) -> MnistSource:
    """A folder the user named (--mnist-dir / $MNISTSUM_MNIST_DIR) is used as is; else the
    folder `prepare` read (`prepared_root`, when there is a dataset), without downloading;
    otherwise torchvision downloads into `default_root` (or finds what it downloaded before)."""
    if mnist_dir is not None:
        return MnistSource(root=_torchvision_root(Path(mnist_dir)), download=False)
    if prepared_root is not None:
        return MnistSource(root=Path(prepared_root), download=False)
    return MnistSource(root=default_root, download=True)


def _torchvision_root(folder: Path) -> Path:
    """Accept the root torchvision wants (holding MNIST/raw), the MNIST folder or the raw folder."""
    folder = folder.expanduser().resolve()
    if folder.name == "raw" and folder.parent.name == "MNIST":
        return folder.parent.parent
    if folder.name == "MNIST" and (folder / "raw").is_dir():
        return folder.parent
    return folder


def file_stamps(source: MnistSource) -> dict[str, list[int]]:
    """[size, modification time in ns] of each raw MNIST file present: when a dataset recorded
    the same stamps, its MNIST files are unchanged and need not be read to tell."""
    stamps = {}
    for name in RAW_FILES:
        try:
            stat = (source.raw_dir / name).stat()
        except OSError:
            continue
        stamps[name] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def load_mnist(source: MnistSource) -> Mnist:
    """Read both MNIST sets with torchvision.datasets.MNIST, downloading when allowed."""
    import numpy as np
    from torchvision.datasets import MNIST

    if not source.download:
        missing = [name for name in RAW_FILES if not (source.raw_dir / name).is_file()]
        if missing:
            raise MnistsumError(
                f"MNIST not found: {source.raw_dir} lacks {', '.join(missing)}; point --mnist-dir "
                f"(or ${MNIST_DIR_ENV}) at a folder holding MNIST/raw/*-ubyte"
            )
    stamps = file_stamps(source)
    made = [folder for folder in (source.raw_dir, source.raw_dir.parent) if not folder.exists()]
    images, labels = {}, {}
    for name, train in (("train", True), ("test", False)):
        try:
            dataset = MNIST(str(source.root), train=train, download=source.download)
        except Exception as error:  # network errors, torchvision's RuntimeError, bad IDX files
            _remove_empty(made)
            raise MnistsumError(_load_failure(source, error)) from None
        images[name] = dataset.data.numpy()
        labels[name] = dataset.targets.numpy().astype(np.int64)
        _check_set(source, name, images[name], labels[name])
    fingerprint = fingerprint_arrays(images["train"], labels["train"], images["test"], labels["test"])
    if source.download:  # the files were only now written
        stamps = file_stamps(source)
    return Mnist(images=images, labels=labels, root=source.root.resolve(), fingerprint=fingerprint, stamps=stamps)


def _remove_empty(folders: list[Path]) -> None:
    """A refused download leaves nothing: the MNIST/raw folders torchvision made stay only if
    they hold a file."""
    for folder in folders:  # raw first, then its parent
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone
            pass


def _load_failure(source: MnistSource, error: Exception) -> str:
    # torchvision's message is "Error downloading X:\nTried URL, got:\n<cause>": one line, cause kept
    reason = " ".join(str(error).split()) or first_line(error)
    if source.download:
        return (
            f"could not download MNIST into {source.raw_dir} ({reason}); without network access, "
            f"put the files there or pass --mnist-dir DIR / set ${MNIST_DIR_ENV} to a folder holding MNIST/raw"
        )
    return f"could not read MNIST from {source.raw_dir} ({reason}): the IDX files look damaged"


def _check_set(source: MnistSource, name: str, images: np.ndarray, labels: np.ndarray) -> None:
    import numpy as np

    where = f"MNIST {name} set in {source.raw_dir}"
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise MnistsumError(f"{where}: images are {images.dtype} {images.shape}, expected uint8 N x 28 x 28")
    if len(labels) != len(images) or len(images) == 0:
        raise MnistsumError(f"{where}: {len(images)} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() > 9:
        raise MnistsumError(f"{where}: labels outside 0-9")
