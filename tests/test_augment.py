"""The batched training augmentation: random shifts, rotations and zooms."""

from __future__ import annotations

import math

import pytest
import torch

from mnistsum_cli.data.tensors import augment, random_rotate_zoom, random_shift, rotate_zoom
from mnistsum_cli.settings import TrainConfig


def _images(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_shift_moves_each_image_by_whole_pixels_within_range() -> None:
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    images[:, 14, 14] = 255  # one bright pixel each
    shifted = random_shift(images, 3, torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    rows, cols = (shifted == 255).nonzero()[:, 1:].T
    assert len(rows) == 64  # every image kept its pixel
    offsets = torch.stack([rows - 14, cols - 14])
    assert offsets.abs().max() <= 3
    assert len({tuple(pair) for pair in offsets.T.tolist()}) > 10  # each image its own offset


def test_shift_fills_with_zeros() -> None:
    images = torch.full((32, 28, 28), 255, dtype=torch.uint8)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(1))
    assert (shifted == 0).any() and ((shifted == 0) | (shifted == 255)).all()


def test_rotation_by_a_right_angle_is_exact() -> None:
    images = _images()
    turned = rotate_zoom(images, torch.full((8,), math.pi / 2), torch.ones(8))
    assert torch.allclose(turned, torch.rot90(images.float(), 1, (1, 2)), atol=0.01)
    assert torch.allclose(rotate_zoom(images, torch.zeros(8), torch.ones(8)), images.float(), atol=0.01)


def test_zoom_magnifies_about_the_centre() -> None:
    images = torch.zeros(1, 28, 28, dtype=torch.uint8)
    images[0, 10:18, 10:18] = 255  # an 8 x 8 square in the middle; twice as big: rows 6-21
    bigger = rotate_zoom(images, torch.zeros(1), torch.tensor([2.0]))
    assert (bigger > 127).sum() == 16 * 16
    assert bigger[0, 14, 14] == 255 and bigger[0, 3, 3] == 0 and bigger[0, 24, 24] == 0


@pytest.mark.parametrize("rotation, zoom", [(0.0, 0.0), (15.0, 0.0), (0.0, 0.2), (15.0, 0.2)])
def test_random_rotate_zoom(rotation: float, zoom: float) -> None:
    images = _images()
    first = random_rotate_zoom(images, rotation, zoom, torch.Generator().manual_seed(2))
    again = random_rotate_zoom(images, rotation, zoom, torch.Generator().manual_seed(2))
    assert torch.equal(first, again)  # the generator decides everything
    if rotation == zoom == 0:
        assert first is images  # off: untouched, still uint8
    else:
        assert first.shape == images.shape and first.dtype == torch.float32
        assert first.min() >= 0 and first.max() <= 255
        assert not torch.allclose(first, images.float(), atol=1.0)


def test_augment_applies_the_configured_steps() -> None:
    images = _images()
    plain = augment(images, TrainConfig(max_shift=0), torch.Generator())
    assert plain is images
    warped = augment(images, TrainConfig(max_shift=2, max_rotation=10, max_zoom=0.1), torch.Generator().manual_seed(3))
    assert warped.dtype == torch.float32 and warped.shape == images.shape
