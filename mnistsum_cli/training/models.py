"""The model registry: every architecture maps (images, numbers) to (digit logits, sum logits).

images: float [B, 1, 28, 28], normalised; numbers: int64 [B] in 0-9.
digit logits: [B, 10]; sum logits: [B, 19] for sums 0-18. The sum is always computed inside
the model from the digit head's output and the number, in fp32 even under autocast: its
logits are scaled and compared closely, and bf16 would round them into ties.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.paths import NUM_DIGITS, NUM_SUMS


def full_precision(tensor: torch.Tensor):
    """A block that runs in fp32 whatever autocast is on: cast its inputs with .float()."""
    return torch.autocast(tensor.device.type, enabled=False)


class GlobalMaxPool(nn.Module):
    """[B, C, H, W] -> [B, C]: the maximum of each channel (its CUDA backward is deterministic,
    unlike AdaptiveMaxPool2d's)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.amax(dim=(2, 3))


class FlattenPixelMajor(nn.Module):
    """[B, C, H, W] -> [B, H * W * C], pixel by pixel: a view of a channels_last tensor, where
    nn.Flatten would copy it and hand the layers before it gradients in another layout."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.permute(0, 2, 3, 1).flatten(1)


class DigitPlusNumber(nn.Module):
    """Sum head: a linear map of the outer product of the digit distribution and the one-hot number.

    That product has one feature per (digit, number) pair, so the layer can learn the addition
    table exactly and its sum prediction then agrees with the digit prediction. It starts at
    zero, and its output is scaled by 10: Adam moves a weight by about lr per step, and
    unscaled the head would need thousands of steps to become confident.
    """

    logit_scale = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(NUM_DIGITS * NUM_DIGITS, NUM_SUMS)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, digit_logits: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        with full_precision(digit_logits):
            digit_probs = digit_logits.float().softmax(dim=1)
            number_onehot = nn.functional.one_hot(numbers, NUM_DIGITS).float()
            pairs = digit_probs[:, :, None] * number_onehot[:, None, :]
            return self.logit_scale * self.mix(pairs.flatten(1))


def conv_bn(c_in: int, c_out: int, kernel_size: int = 3, pool: bool = False) -> nn.Sequential:
    """Conv, BatchNorm, ReLU; with pool, a 2x2 max-pool straight after the conv (airbench's
    order), so BatchNorm and ReLU run on a quarter of the pixels."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=kernel_size, padding=kernel_size // 2, bias=False),
        *([nn.MaxPool2d(2)] if pool else []),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvDigitNet(nn.Module):
    """Conv features, a linear digit head on them, and the DigitPlusNumber sum head."""

    def __init__(self, features: nn.Module, num_features: int) -> None:
        super().__init__()
        self.features = features
        self.digit_head = nn.Linear(num_features, NUM_DIGITS)
        self.sum_head = DigitPlusNumber()

    def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        digit_logits = self.digit_head(self.features(images))
        return digit_logits, self.sum_head(digit_logits, numbers)


class FastNet(ConvDigitNet):
    """The default: a small VGG-style CNN with BatchNorm, tuned for time-to-accuracy."""

    def __init__(self, width: int = 32) -> None:
        features = nn.Sequential(
            conv_bn(1, width),
            conv_bn(width, width),
            nn.MaxPool2d(2),  # 14 x 14
            conv_bn(width, 2 * width),
            conv_bn(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 7 x 7
            conv_bn(2 * width, 4 * width),
            GlobalMaxPool(),
        )
        super().__init__(features, 4 * width)


class LeanNet(ConvDigitNet):
    """Shaped for a CPU's FLOP budget: one 5x5 conv with few channels at 28 x 28, where every
    channel is expensive, more channels only after each pool, each pool straight after its conv,
    and the 7 x 7 maps flattened into the digit head (keeping where a stroke is)."""

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 32)) -> None:
        features = nn.Sequential(
            conv_bn(1, widths[0], kernel_size=5, pool=True),  # 14 x 14
            conv_bn(widths[0], widths[1], pool=True),  # 7 x 7
            conv_bn(widths[1], widths[2]),
            FlattenPixelMajor(),
        )
        super().__init__(features, widths[2] * 7 * 7)


class LeNetSum(nn.Module):
    """The LeNet design (EVA8 assignment): LeNet with ReLU convs and sigmoid FC layers; its
    softmax output, stacked with the raw number, feeds three sigmoid FC layers that give the sum.

    The design applies softmax/sigmoid after FC3 and FC_A_3; here those layers return logits
    (the activation is monotonic, so predictions are the same) and the loss applies softmax.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),  # conv1
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),  # conv2
            nn.AvgPool2d(2),  # 14 x 14
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),  # conv3
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),  # conv4
            nn.AvgPool2d(2),  # 7 x 7
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 7 * 7, 120),
            nn.Sigmoid(),  # FC1
            nn.Linear(120, 84),
            nn.Sigmoid(),  # FC2
            nn.Linear(84, NUM_DIGITS),  # FC3 (softmax)
        )
        self.sum_net = nn.Sequential(
            nn.Linear(NUM_DIGITS + 1, 64),
            nn.Sigmoid(),  # FC_A_1
            nn.Linear(64, 32),
            nn.Sigmoid(),  # FC_A_2
            nn.Linear(32, NUM_SUMS),  # FC_A_3 (sigmoid)
        )

    def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        digit_logits = self.classifier(self.features(images))
        with full_precision(digit_logits):
            digit_probs = digit_logits.float().softmax(dim=1)
            stacked = torch.cat([digit_probs, numbers[:, None].float()], dim=1)
            return digit_logits, self.sum_net(stacked)


class ConvNetSum(nn.Module):
    """The conv/BatchNorm classifier design: two 5x5 convs, a 1x1 conv to 10 maps, max-pool, a BatchNorm MLP to the digit;
    the digit logits concatenated with the one-hot number go through a 20 → 50 → 19 mix MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 64, 5),
            nn.ReLU(),
            nn.Conv2d(64, 128, 5),
            nn.ReLU(),
            nn.Conv2d(128, 10, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 10 x 10 x 10
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(1000, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Linear(256, NUM_DIGITS),
        )
        self.mix = nn.Sequential(nn.Linear(2 * NUM_DIGITS, 50), nn.ReLU(), nn.Linear(50, NUM_SUMS))

    def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        digit_logits = self.classifier(self.conv(images))
        with full_precision(digit_logits):
            number_onehot = nn.functional.one_hot(numbers, NUM_DIGITS).float()
            return digit_logits, self.mix(torch.cat([digit_logits.float(), number_onehot], dim=1))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "fastnet": partial(FastNet, width=32),
    "fastnet-small": partial(FastNet, width=16),
    "fastnet-wide": partial(FastNet, width=64),
    "lean": LeanNet,
    "lenet": LeNetSum,
    "convnet": ConvNetSum,
}


def build_model(arch: str) -> nn.Module:
    try:
        return ARCHITECTURES[arch]()
    except KeyError:
        raise MnistsumError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}") from None
