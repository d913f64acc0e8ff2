"""Reading MNIST through torchvision's real loader from IDX files on disk."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FakeMnist, idx_images, idx_labels, make_fake_mnist, write_mnist
from mnistsum_cli.data.mnist import RAW_FILES, MnistSource, load_mnist, resolve_source
from mnistsum_cli.errors import MnistsumError

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch


def test_load_fixture_through_torchvision(fake_mnist: FakeMnist) -> None:
    mnist = load_mnist(resolve_source(fake_mnist.root))
    assert mnist.sizes == {"train": 400, "test": 120}
    for name in ("train", "test"):
        assert mnist.images[name].dtype == np.uint8
        assert mnist.images[name].shape == (len(fake_mnist.labels[name]), 28, 28)
        np.testing.assert_array_equal(mnist.images[name], fake_mnist.images[name])
        np.testing.assert_array_equal(mnist.labels[name], fake_mnist.labels[name].astype(np.int64))
    assert mnist.root == fake_mnist.root.resolve()
    assert isinstance(mnist.fingerprint, str) and len(mnist.fingerprint) >= 8


def test_given_folder_is_never_downloaded_into(fake_mnist: FakeMnist) -> None:
    assert resolve_source(fake_mnist.root).download is False


def test_no_folder_means_download_into_default_root(tmp_path: Path) -> None:
    source = resolve_source(None, default_root=tmp_path / "data")
    assert source.download is True
    assert source.root == tmp_path / "data"


@pytest.mark.parametrize("level", ["root", "MNIST", "raw"])
def test_root_mnist_or_raw_folder_all_work(fake_mnist: FakeMnist, level: str) -> None:
    folder = {"root": fake_mnist.root, "MNIST": fake_mnist.root / "MNIST", "raw": fake_mnist.raw_dir}[level]
    source = resolve_source(folder)
    assert source.root == fake_mnist.root.resolve()
    assert source.raw_dir == fake_mnist.raw_dir.resolve()
    mnist = load_mnist(source)
    np.testing.assert_array_equal(mnist.labels["train"], fake_mnist.labels["train"])


def test_string_path_is_accepted(fake_mnist: FakeMnist) -> None:
    mnist = load_mnist(resolve_source(str(fake_mnist.raw_dir)))  # type: ignore[arg-type]
    assert mnist.sizes["test"] == 120


def test_empty_folder_names_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(MnistsumError) as info:
        load_mnist(resolve_source(tmp_path))
    message = str(info.value)
    assert "--mnist-dir" in message
    assert "MNIST/raw" in message
    for name in RAW_FILES:
        assert name in message
    # nothing was downloaded or created there
    assert list(tmp_path.iterdir()) == []


def test_one_missing_file_is_named(fake_mnist: FakeMnist, tmp_path: Path) -> None:
    root = tmp_path / "mnist"
    shutil.copytree(fake_mnist.root, root)
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(MnistsumError) as info:
        load_mnist(resolve_source(root))
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message
    assert "train-images-idx3-ubyte" not in message
    assert "--mnist-dir" in message


def _copy_with(fake_mnist: FakeMnist, tmp_path: Path, name: str, content: bytes) -> Path:
    root = tmp_path / "mnist"
    shutil.copytree(fake_mnist.root, root)
    (root / "MNIST" / "raw" / name).write_bytes(content)
    return root


@pytest.mark.parametrize(
    "name, damage",
    [
        ("train-images-idx3-ubyte", "truncate"),
        ("train-labels-idx1-ubyte", "truncate"),
        ("t10k-images-idx3-ubyte", "truncate"),
        ("t10k-images-idx3-ubyte", "garbage"),
        ("train-labels-idx1-ubyte", "garbage"),
        ("train-images-idx3-ubyte", "empty"),
        ("train-images-idx3-ubyte", "header-only"),
        ("t10k-labels-idx1-ubyte", "extra-bytes"),
    ],
)
def test_damaged_idx_file_is_a_clear_error(fake_mnist: FakeMnist, tmp_path: Path, name: str, damage: str) -> None:
    original = (fake_mnist.raw_dir / name).read_bytes()
    content = {
        "truncate": original[: len(original) // 2],
        "garbage": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "header-only": original[:16],
        "extra-bytes": original + b"\x07" * 13,
    }[damage]
    root = _copy_with(fake_mnist, tmp_path, name, content)
    with pytest.raises(MnistsumError) as info:
        load_mnist(resolve_source(root))
    assert str(info.value).strip(), "empty error message"
    assert "\n" not in str(info.value)


def test_label_count_differing_from_image_count_is_an_error(fake_mnist: FakeMnist, tmp_path: Path) -> None:
    root = _copy_with(fake_mnist, tmp_path, "train-labels-idx1-ubyte", idx_labels(fake_mnist.labels["train"][:-3]))
    with pytest.raises(MnistsumError, match="labels"):
        load_mnist(resolve_source(root))


def test_labels_outside_0_9_are_an_error(fake_mnist: FakeMnist, tmp_path: Path) -> None:
    labels = fake_mnist.labels["test"].copy()
    labels[5] = 12
    root = _copy_with(fake_mnist, tmp_path, "t10k-labels-idx1-ubyte", idx_labels(labels))
    with pytest.raises(MnistsumError, match="0-9"):
        load_mnist(resolve_source(root))


def test_images_of_wrong_size_are_an_error(fake_mnist: FakeMnist, tmp_path: Path) -> None:
    small = np.zeros((120, 20, 20), dtype=np.uint8)
    root = _copy_with(fake_mnist, tmp_path, "t10k-images-idx3-ubyte", idx_images(small))
    with pytest.raises(MnistsumError, match="28"):
        load_mnist(resolve_source(root))


def test_fingerprint_is_stable_and_changes_with_one_pixel(fake_mnist: FakeMnist, tmp_path: Path) -> None:
    base = load_mnist(resolve_source(fake_mnist.root)).fingerprint

    same = make_fake_mnist(tmp_path / "same")  # regenerated with the same seed: same bytes
    assert load_mnist(resolve_source(same.root)).fingerprint == base

    images = {name: array.copy() for name, array in fake_mnist.images.items()}
    images["test"][7, 13, 13] ^= 1
    changed = write_mnist(tmp_path / "changed", images, fake_mnist.labels)
    assert load_mnist(resolve_source(changed.root)).fingerprint != base

    labels = {name: array.copy() for name, array in fake_mnist.labels.items()}
    labels["train"][0] = (labels["train"][0] + 1) % 10
    relabelled = write_mnist(tmp_path / "relabelled", fake_mnist.images, labels)
    assert load_mnist(resolve_source(relabelled.root)).fingerprint != base


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(RAW_FILES),
    cut=st.integers(0, 64),
    flips=st.lists(st.integers(0, 8 * 40), min_size=0, max_size=4),
)
def test_fuzz_damaged_idx_headers(name: str, cut: int, flips: list[int]) -> None:
    """Truncation and bit flips (mostly in the 8-16 byte IDX header) of one file: load_mnist
    either reads valid MNIST or raises MnistsumError, never anything else."""
    with tempfile.TemporaryDirectory() as folder:
        fake = make_fake_mnist(Path(folder), n_train=20, n_test=10, seed=5)
        path = fake.raw_dir / name
        content = bytearray(path.read_bytes())
        content = content[: len(content) - cut] if cut else content
        for bit in flips:
            if content:
                position = bit % (8 * len(content))
                content[position // 8] ^= 1 << (position % 8)
        path.write_bytes(bytes(content))
        try:
            mnist = load_mnist(resolve_source(fake.root))
        except MnistsumError:
            return
        for split in ("train", "test"):
            assert mnist.images[split].shape[1:] == (28, 28)
            assert len(mnist.images[split]) == len(mnist.labels[split]) > 0
            assert mnist.labels[split].min() >= 0 and mnist.labels[split].max() <= 9


def test_failed_download_names_its_cause_and_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import MNIST

    def refuse(self) -> None:
        (Path(self.raw_folder)).mkdir(parents=True, exist_ok=True)
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://example/, got:\n<urlopen error no network>\n"
        )

    monkeypatch.setattr(MNIST, "download", refuse)
    with pytest.raises(MnistsumError) as caught:
        load_mnist(MnistSource(root=tmp_path / "data", download=True))
    message = str(caught.value)
    assert "\n" not in message and "no network" in message
    assert not (tmp_path / "data" / "MNIST").exists()
