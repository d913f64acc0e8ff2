"""Training settings, each declared once with its command-line help and bounds, and the named
presets that set them.

A setting is a TrainConfig field made with `setting(...)`: `train` and `run` derive their
`--<name>` options from these fields (mnistsum_cli/cli/options.py), so adding a field adds the option.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional, get_type_hints

from mnistsum_cli.errors import MnistsumError

# The names models.ARCHITECTURES builds, here so that option checks need no torch (a test
# keeps the two in step).
ARCHITECTURE_NAMES = ("fastnet", "fastnet-small", "fastnet-wide", "lean", "lenet", "convnet")

# Seeds are 0 .. 2**32 - 1 (`prepare --seed`, `train --seed`): NumPy refuses negative seeds, and
# each epoch's torch seed, seed * 100_003 + epoch, must stay below torch's limit of 2**64.
MAX_SEED = 2**32 - 1
# Upper bounds that catch a typo before it runs for ever (`--epochs 100000000000`) or overflows:
# the presets train 2-20 epochs, so 10000 is no run anyone means; a batch larger than MNIST's
# 60000 training images is one batch of the whole split; the presets' peak learning rates are
# 2e-3 to 1e-2, a thousandth of 10 (1e308 made the one-cycle schedule overflow to inf, and the
# weights to NaN); AdamW multiplies the weights by 1 - lr * decay each step, so a decay above 1
# is no regulariser but a reset of the weights (the presets use 5e-4).
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 60_000
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 1.0


@dataclass(frozen=True)
class Setting:
    """How a training setting appears on the command line: its help and the values it takes.

    `min`/`max` are inclusive bounds, `above` an exclusive lower bound, `choices` the only
    values allowed; a float setting is always finite. The same bounds check the settings that
    artifacts record (schemas.SETTINGS_RECORD is derived from them), so a hand-edited checkpoint or
    history is held to what the command line takes.
    """

    help: str
    words: str = "{}"  # how a caption says it: "{}" stands for the value, "{s}" for a plural's s (in_words)
    min: Optional[float] = None
    max: Optional[float] = None
    above: Optional[float] = None
    choices: Optional[tuple[str, ...]] = None

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` is refused, or None: the whole rule in one place. On the command line
        click's range and choice types apply min, max and choices first (and show them in
        --help); the option's callback asks this for the rest."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value} is not a finite number"
        if self.above is not None and not value > self.above:
            return f"{value} must be greater than {self.above:g}"
        if self.min is not None and value < self.min:
            return f"{value} is below {self.min:g}"
        if self.max is not None and value > self.max:
            return f"{value} is above {self.max:g}"
        if self.choices is not None and value not in self.choices:
            return f"{value!r} is not one of {', '.join(self.choices)}"
        return None


def setting(default: Any, help: str, words: str, **bounds: Any) -> Any:
    """A TrainConfig field carrying its Setting (see Setting for `words` and `bounds`)."""
    return field(default=default, metadata={"setting": Setting(help, words, **bounds)})


@dataclass(frozen=True)
class TrainConfig:
    arch: str = setting("fastnet", "Network architecture.", "{} network", choices=ARCHITECTURE_NAMES)
    epochs: int = setting(10, "Passes over the training split.", "{} epoch{s}", min=1, max=MAX_EPOCHS)
    batch_size: int = setting(
        1024, "Rows per step (BatchNorm needs 2 or more).", "batches of {}", min=2, max=MAX_BATCH_SIZE
    )
    lr: float = setting(6e-3, "Peak learning rate (one-cycle).", "peak lr {}", above=0, max=MAX_LR)
    weight_decay: float = setting(
        5e-4, "AdamW weight decay of conv and linear weights.", "weight decay {}", min=0, max=MAX_WEIGHT_DECAY
    )
    warmup: float = setting(
        0.2, "Share of the steps spent rising to the peak learning rate.", "warm-up {} of the steps", min=0, max=1
    )
    label_smoothing: float = setting(0.0, "Label smoothing of both losses.", "label smoothing {}", min=0, max=0.5)
    max_shift: int = setting(2, "Random-shift augmentation, pixels; 0 turns it off.", "shifts ±{} px", min=0, max=8)
    max_rotation: float = setting(
        0.0, "Random-rotation augmentation, ± degrees; 0 turns it off.", "rotations ±{}°", min=0, max=180
    )
    max_zoom: float = setting(0.0, "Random scaling by 1 ± this; 0 turns it off.", "zoom ±{}", min=0, max=0.5)
    seed: int = setting(0, "Seed of weights, shuffling and augmentation.", "seed {}", min=0, max=MAX_SEED)
    amp: bool = setting(
        True, "Mixed precision on CUDA: bf16, or fp16 on pre-Ampere GPUs (ignored on the CPU).", "mixed precision {}"
    )
    channels_last: bool = setting(True, "channels_last (NHWC) memory format.", "channels-last {}")
    compile: bool = setting(False, "torch.compile the model.", "torch.compile {}")
    deterministic: bool = setting(
        False, "CUDA: bit-exact reruns and resumes (no cuDNN autotuning; slower).", "deterministic {}"
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Settings read from an artifact, which its schema checked (schemas.SETTINGS_RECORD)."""
        return cls(**data)

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        """Replace the settings given (None means: keep the preset's)."""
        return replace(self, **{key: value for key, value in overrides.items() if value is not None})

    def changes_to(self, other: TrainConfig) -> list[str]:
        """The settings `other` changes, as 'name old → new'."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key} {mine[key]} → {theirs[key]}" for key in mine if mine[key] != theirs[key]]


def in_words(name: str, value: Any) -> str:
    """Setting `name` at `value` as a caption says it: "batches of 128", "peak lr 0.01",
    "mixed precision off" (a switch is on or off; a number in its shortest form)."""
    if isinstance(value, bool):
        shown = "on" if value else "off"
    elif isinstance(value, float):
        shown = f"{value:g}"
    else:
        shown = str(value)
    return TRAIN_SETTINGS[name].words.format(shown, s="" if value == 1 else "s")


def setting_fields() -> list[tuple[str, type, Setting]]:
    """(name, type, Setting) of every training setting, in declaration order."""
    types = get_type_hints(TrainConfig)
    return [(each.name, types[each.name], each.metadata["setting"]) for each in fields(TrainConfig)]


TRAIN_SETTINGS: dict[str, Setting] = {name: each for name, _, each in setting_fields()}


PRESETS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    "cpu": TrainConfig(arch="lean", epochs=2, batch_size=128, lr=1e-2, max_shift=0),
    "cpu-v1": TrainConfig(arch="fastnet-small", epochs=2, batch_size=128, lr=4e-3),
    "best": TrainConfig(epochs=20, label_smoothing=0.1),
    "lenet": TrainConfig(arch="lenet", epochs=15, batch_size=128, lr=2e-3, max_shift=0),
    "convnet": TrainConfig(arch="convnet", epochs=8, batch_size=128, lr=2e-3, max_shift=0),
}
DEFAULT_PRESET = "default"

# What each preset is for; describe_preset adds the settings themselves. Times and accuracies
# are measured in docs/performance.md, not stated here.
PRESET_NOTES: dict[str, str] = {
    "default": "time to accuracy on a GPU; the default there",
    "cpu": "quick training on the CPU; the default there",
    "cpu-v1": "the previous cpu preset",
    "best": "the default, twice as long, with label smoothing 0.1",
    "lenet": "the LeNet design of the EVA8 assignment",
    "convnet": "the conv/BatchNorm classifier design",
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
