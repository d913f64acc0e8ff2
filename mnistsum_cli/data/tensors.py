"""Splits as tensors on the training device; batches are index slices, not Dataset items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mnistsum_cli.data.mnist import Mnist
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.paths import MNIST_SET_OF_SPLIT
from mnistsum_cli.store.splits import Dataset

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True)
class SplitTensors:
    """One split on one device: uint8 images [N, 28, 28] and int64 digits, numbers, sums [N]."""

    images: torch.Tensor
    digits: torch.Tensor
    numbers: torch.Tensor
    sums: torch.Tensor

    def __len__(self) -> int:
        return len(self.digits)


def split_tensors(dataset: Dataset, mnist: Mnist, split: str, device: torch.device) -> SplitTensors:
    """Gather a split's images from MNIST and move everything to `device` once."""
    rows = dataset.splits[split]
    mnist_set = MNIST_SET_OF_SPLIT[split]
    index = rows.image_index.astype(np.int64)
    if (mnist.labels[mnist_set][index] != rows.digit).any():
        raise MnistsumError(f"the {split} split's digits disagree with the MNIST labels: rerun `mnistsum prepare`")

    def to_device(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(array, dtype=dtype).to(device)

    return SplitTensors(
        images=to_device(mnist.images[mnist_set][index], torch.uint8),
        digits=to_device(rows.digit, torch.int64),
        numbers=to_device(rows.number, torch.int64),
        sums=to_device(rows.sum, torch.int64),
    )


def normalise(images: torch.Tensor) -> torch.Tensor:
    """[B, 28, 28] on the 0-255 scale (uint8 or float) → float [B, 1, 28, 28] with MNIST's mean and std."""
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], zero-filled.

    One pad and one gather for the whole batch; the generator lives on the images' device.
    """
    if max_shift <= 0:
        return images
    batch = images.shape[0]
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), device=images.device, generator=generator)
    grid = torch.arange(28, device=images.device)
    rows = (grid[None, :] + offsets[0, :, None])[:, :, None]  # [B, 28, 1]
    cols = (grid[None, :] + offsets[1, :, None])[:, None, :]  # [B, 1, 28]
    return padded[torch.arange(batch, device=images.device)[:, None, None], rows, cols]


def rotate_zoom(images: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by angles[i] radians and magnify it by scales[i]
    (bilinear, zero-filled): [B, 28, 28] of any dtype → float [B, 28, 28] on the same 0-255 scale."""
    cos, sin = angles.cos() / scales, angles.sin() / scales
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    pixels = images.float().unsqueeze(1)
    grid = torch.nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
    return torch.nn.functional.grid_sample(pixels, grid, align_corners=False).squeeze(1)


def random_rotate_zoom(
    images: torch.Tensor, max_rotation: float, max_zoom: float, generator: torch.Generator
) -> torch.Tensor:
    """Rotate each image by its own random angle in ±max_rotation degrees and scale it by a
    random factor in [1 - max_zoom, 1 + max_zoom]: one batched warp."""
    if max_rotation <= 0 and max_zoom <= 0:
        return images
    uniform = torch.rand((2, images.shape[0]), device=images.device, generator=generator) * 2 - 1
    angles = torch.deg2rad(uniform[0] * max_rotation)
    return rotate_zoom(images, angles, 1 + uniform[1] * max_zoom)


def augment(images: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The training augmentation of a batch of uint8 images, ready for `normalise`."""
    shifted = random_shift(images, config.max_shift, generator)
    return random_rotate_zoom(shifted, config.max_rotation, config.max_zoom, generator)
