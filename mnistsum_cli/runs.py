"""A training run in an artifacts folder: which settings it uses, what is saved, starting a new
run without losing the previous one, and messages that say what an interrupt left on disk."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from mnistsum_cli.artifacts import DEFAULT_ARTIFACTS, DataDir, RunDir, restore_run, set_aside_run
from mnistsum_cli.config import TrainConfig, describe_preset, preset, preset_for_device
from mnistsum_cli.errors import Interrupted, MnistsumError
from mnistsum_cli.schemas import TRAIN_STATE

if TYPE_CHECKING:  # torch loads only when training starts
    import torch

    from mnistsum_cli.distributed import Group
    from mnistsum_cli.mnist import Mnist
    from mnistsum_cli.train import Reporter, TrainOutcome

MIN_STEPS_PER_EPOCH = 20  # fewer optimizer steps per epoch and a model barely leaves chance


@dataclass(frozen=True)
class SavedRun:
    """What train_state.json says about the run in an artifacts folder."""

    run_id: str
    config: TrainConfig
    epoch: int  # epochs saved
    best_epoch: int  # the epoch model.safetensors holds

    @property
    def complete(self) -> bool:
        return self.epoch >= self.config.epochs


def saved_run(run: RunDir) -> Optional[SavedRun]:
    """The run saved in `run`, or None when there is none (or its state file is unreadable)."""
    if not run.train_state.exists():
        return None
    try:
        state = TRAIN_STATE.read_json(run.train_state)
    except MnistsumError:
        return None
    return SavedRun(
        run_id=state["run_id"], config=TrainConfig.from_dict(state["config"]), epoch=state["epoch"], best_epoch=state["best_epoch"]
    )


def choose_config(
    preset_name: Optional[str], overrides: dict[str, Any], device_type: str, saved: Optional[TrainConfig] = None
) -> tuple[TrainConfig, Optional[str]]:
    """The settings to train with, and a notice when they were chosen for the user.

    A named preset wins; else the settings of the saved run (`run` keeps them); else the
    preset that fits the device. Flags override each of them.
    """
    if preset_name is not None:
        return preset(preset_name).with_overrides(**overrides), None
    if saved is not None:
        return saved.with_overrides(**overrides), None
    name = preset_for_device(device_type)
    where = "a GPU" if device_type == "cuda" else "the CPU"
    notice = f"no --preset: using `{name}` on {where}: {describe_preset(name)}; --preset NAME picks another"
    return preset(name).with_overrides(**overrides), notice


def continue_command(command: str, run: RunDir) -> str:
    """`mnistsum <command>`, naming the artifacts folder when it is not the default."""
    folder = "" if run.root == DEFAULT_ARTIFACTS else f" --artifacts {run.root}"
    return f"mnistsum {command}{folder}"


def few_steps_warning(rows: int, batch_size: int, steps: int) -> Optional[str]:
    """A warning when an epoch has too few optimizer steps to learn from."""
    if steps >= MIN_STEPS_PER_EPOCH:
        return None
    smaller = max(2, rows // MIN_STEPS_PER_EPOCH)
    return (
        f"only {steps} optimizer step{'s' if steps != 1 else ''} per epoch ({rows} training rows, batches of "
        f"{batch_size}): the model may stay near chance; pass a smaller --batch-size (e.g. {smaller}) "
        "or prepare more data (a larger --limit, or none)"
    )


def kept_message(previous: Optional[SavedRun], kept: Path) -> str:
    """Where the run a new one replaced went, and how to get it back."""
    if previous is None:
        return f"kept the files of the previous run in {kept}"
    if previous.complete:
        return f"kept the previous run ({previous.config.arch}, {previous.epoch} epochs) in {kept}"
    return (
        f"the artifacts folder held a resumable run (epoch {previous.epoch} of {previous.config.epochs}): "
        f"kept it in {kept}; continue it there with `mnistsum train --resume --artifacts {kept}`"
    )


def interrupted_message(run: RunDir, continue_with: str, kept: Optional[Path], restored: bool) -> str:
    """What Ctrl-C left in `run`, read from the saved state, and what to do next. `kept`: where
    the previous run is; `restored`: it was put back, as the new run saved nothing."""
    if restored:
        return f"interrupted before the first epoch was saved: the previous run is back in {run.root}, unchanged"
    saved = saved_run(run)
    previous = f"; the previous run is kept in {kept}" if kept is not None else ""
    if saved is None:
        return "interrupted before the first epoch was saved: no epoch of this run is on disk"
    if saved.complete:
        return f"interrupted after the last epoch was saved: all {saved.epoch} epochs are in {run.root}{previous}"
    return (
        f"interrupted: epoch {saved.epoch} of {saved.config.epochs} is saved in {run.root} "
        f"(model.safetensors holds epoch {saved.best_epoch}); continue with `{continue_with}`{previous}"
    )


def run_training(
    config: TrainConfig,
    data_dir: DataDir,
    run: RunDir,
    device: torch.device,
    *,
    resume: bool,
    continue_with: str,
    notify: Callable[[str], None],
    reporter: Reporter,
    mnist_dir: Optional[Path] = None,
    mnist: Optional[Mnist] = None,
    group: Optional[Group] = None,
) -> TrainOutcome:
    """train_model, keeping the user's runs safe: check the inputs before anything moves, set
    the previous run aside (saying where; it comes back if the new run stops before saving an
    epoch), warn about too few steps per epoch, and turn Ctrl-C into a message built from
    what is saved. Under torchrun (`group`) rank 0 alone moves runs and speaks."""
    from mnistsum_cli.data import load_dataset
    from mnistsum_cli.distributed import SINGLE_PROCESS
    from mnistsum_cli.train import batching, train_model

    group = group or SINGLE_PROCESS
    started = time.perf_counter()
    dataset, mnist = load_dataset(data_dir, mnist_dir, mnist)
    rows = len(dataset.splits["train"])
    warning = few_steps_warning(rows, *batching(rows, config))
    if warning is not None:
        notify(warning)
    kept = None
    if not resume and group.is_main:
        previous = saved_run(run)
        kept = set_aside_run(run)
        if kept is not None:
            notify(kept_message(previous, kept))
    checked = time.perf_counter() - started
    try:
        outcome = train_model(config, data_dir, run, device, resume=resume, reporter=reporter, mnist=mnist, group=group)
    except BaseException as error:
        restored = kept is not None and not any(path.exists() for path in run.run_files())
        if restored:
            restore_run(kept, run)
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(interrupted_message(run, continue_with, kept, restored)) from None
        raise
    return replace(outcome, load_seconds=outcome.load_seconds + checked)
