"""Training hyperparameters, in one place, and the named presets that set them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

from mnistsum_cli.errors import MnistsumError

# The names models.ARCHITECTURES builds, here so that option checks need no torch (a test
# keeps the two in step).
ARCHITECTURE_NAMES = ("fastnet", "fastnet-small", "fastnet-wide", "lean", "lenet", "convnet")


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "fastnet"
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 6e-3  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = 5e-4
    warmup: float = 0.2  # share of the steps spent rising to the peak lr
    label_smoothing: float = 0.0
    max_shift: int = 2  # random shift augmentation, pixels; 0 turns it off
    max_rotation: float = 0.0  # random rotation augmentation, ± degrees; 0 turns it off
    max_zoom: float = 0.0  # random scaling by 1 ± this; 0 turns it off
    seed: int = 0
    amp: bool = True  # mixed precision on CUDA: bf16, or fp16 on pre-Ampere GPUs (ignored on the CPU)
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPU and CPU)
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # CUDA: no cuDNN autotuning, deterministic algorithms (slower)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {field.name for field in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise MnistsumError(f"unknown training settings {sorted(unknown)}")
        return cls(**data)

    def with_overrides(self, **overrides: Any) -> "TrainConfig":
        """Replace the settings given (None means: keep the preset's)."""
        return replace(self, **{key: value for key, value in overrides.items() if value is not None})

    def changes_to(self, other: "TrainConfig") -> list[str]:
        """The settings `other` changes, as 'name old → new'."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key} {mine[key]} → {theirs[key]}" for key in mine if mine[key] != theirs[key]]


PRESETS: dict[str, TrainConfig] = {
    # time-to-accuracy on a GPU; what `mnistsum train` uses there with no --preset
    "default": TrainConfig(),
    # the CPU setting: lean, 2 epochs, no shifts; on 2 idle cores (AMD EPYC, AVX2) 9.0-9.3 s of
    # training loop, 13-14 s for `mnistsum train`, 99.09-99.21 % test digit / 99.06-99.22 % sum (seeds 0-4)
    "cpu": TrainConfig(arch="lean", epochs=2, batch_size=128, lr=1e-2, max_shift=0),
    # the cpu preset before issue 12: 99.39 % test digit and sum accuracy in 35-60 s of training loop
    "cpu-v1": TrainConfig(arch="fastnet-small", epochs=2, batch_size=128, lr=4e-3),
    # the most accurate setting: the default, twice as long, with label smoothing
    "best": TrainConfig(epochs=20, label_smoothing=0.1),
    # the seeds' architectures with settings that suit them
    "lenet": TrainConfig(arch="lenet", epochs=15, batch_size=128, lr=2e-3, max_shift=0),
    "convnet": TrainConfig(arch="convnet", epochs=8, batch_size=128, lr=2e-3, max_shift=0),
}
DEFAULT_PRESET = "default"

# What each preset is for and roughly how long it takes (the times measured in README's
# Performance section); describe_preset adds the settings themselves.
PRESET_NOTES: dict[str, str] = {
    "default": "for a GPU; about 15 min on 2 CPU cores",
    "cpu": "quick; about 10 s of training on 2 CPU cores",
    "cpu-v1": "the previous cpu preset; 0.5-1 min on 2 CPU cores",
    "best": "label smoothing 0.1; about 20 min on 2 CPU cores",
    "lenet": "seed 000's network; about 14 min on 2 CPU cores",
    "convnet": "seed 002's network; about 25 min on 2 CPU cores",
}


def describe_preset(name: str) -> str:
    """One line for --help and notices: the preset's main settings and its note."""
    config = PRESETS[name]
    return f"{config.arch}, {config.epochs} epochs, batch {config.batch_size} ({PRESET_NOTES[name]})"


def preset_for_device(device_type: str) -> str:
    """The preset used when none is named: the default on a GPU, the quick one on the CPU."""
    return DEFAULT_PRESET if device_type == "cuda" else "cpu"


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise MnistsumError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def preset_matching(config: TrainConfig) -> Optional[str]:
    """The name of the preset these settings are, if any (runs record their settings, not the
    preset they came from; a preset with changes is no preset)."""
    return next((name for name, settings in PRESETS.items() if settings == config), None)
