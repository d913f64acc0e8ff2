"""A training run in an artifacts folder: which settings it uses, what is saved, starting a new
run without losing the previous one, and messages that say what an interrupt left on disk."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from mnistsum_cli.errors import Interrupted, MnistsumError
from mnistsum_cli.settings import TrainConfig, describe_preset, preset, preset_for_device
from mnistsum_cli.store.locks import folder_lock
from mnistsum_cli.store.paths import DEFAULT_ARTIFACTS, RunDir
from mnistsum_cli.store.schemas import TRAIN_STATE
from mnistsum_cli.training.setaside import aside_folder

if TYPE_CHECKING:  # torch loads only when training starts
    import torch

    from mnistsum_cli.data.prepared import PreparedData
    from mnistsum_cli.training.distributed import Group
    from mnistsum_cli.training.loop import Reporter, TrainOutcome

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
        run_id=state["run_id"],
        config=TrainConfig.from_dict(state["config"]),
        epoch=state["epoch"],
        best_epoch=state["best_epoch"],
    )


def choose_config(
    preset_name: Optional[str],
    overrides: dict[str, Any],
    device_type: Callable[[], str],
    saved: Optional[TrainConfig] = None,
) -> tuple[TrainConfig, Optional[str]]:
    """The settings to train with, and a notice when they were chosen for the user.

    A named preset wins; else the settings of the saved run (`run` keeps them); else the
    preset that fits the device (`device_type` is asked only then: finding the device loads
    torch). Flags override each of them.
    """
    if preset_name is not None:
        return preset(preset_name).with_overrides(**overrides), None
    if saved is not None:
        return saved.with_overrides(**overrides), None
    kind = device_type()
    name = preset_for_device(kind)
    where = "a GPU" if kind == "cuda" else "the CPU"
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


def interrupted_message(run: RunDir, continue_with: str, kept: Optional[Path], untouched: bool) -> str:
    """What Ctrl-C left in `run`, read from the saved state, and what to do next. `kept`: where
    the previous run is; `untouched`: the new run saved nothing, so the previous run never moved."""
    if untouched:
        return f"interrupted before the first epoch was saved: the previous run is still in {run.root}, unchanged"
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
    prepared: PreparedData,
    run: RunDir,
    device: torch.device,
    *,
    resume: bool,
    continue_with: str,
    notify: Callable[[str], None],
    reporter: Reporter,
    group: Optional[Group] = None,
) -> TrainOutcome:
    """train_model, keeping the user's runs safe: hold the artifacts folder's lock, check the
    inputs before anything moves, warn about too few steps per epoch, have the first epoch's
    commit set the previous run aside (saying where), and turn Ctrl-C into a message built from
    what is saved. Under torchrun (`group`) rank 0 alone locks, moves runs and speaks."""
    from mnistsum_cli.data.prepared import check_mnist_matches
    from mnistsum_cli.training.distributed import SINGLE_PROCESS
    from mnistsum_cli.training.loop import batching, train_model

    group = group or SINGLE_PROCESS
    with ExitStack() as held:
        # rank 0 alone writes, so it alone holds the lock; every rank stops when it cannot
        group.agree(
            lambda: held.enter_context(folder_lock(run.root, "train", "--artifacts")) if group.is_main else None
        )
        started = time.perf_counter()
        rows = len(prepared.dataset.splits["train"])
        check_mnist_matches(prepared.dataset, prepared.any_mnist)  # before the previous run moves
        warning = few_steps_warning(rows, *batching(rows, config))
        if warning is not None:
            notify(warning)
        previous, kept = None, None
        if not resume and group.is_main:
            previous, kept = saved_run(run), aside_folder(run)
        checked = time.perf_counter() - started
        try:
            outcome = train_model(
                config, prepared, run, device, resume=resume, reporter=reporter, group=group, kept=kept
            )
        except BaseException as error:
            moved = kept is not None and kept.exists()
            if isinstance(error, KeyboardInterrupt):
                untouched = kept is not None and not moved
                raise Interrupted(interrupted_message(run, continue_with, kept if moved else None, untouched)) from None
            if moved:
                notify(kept_message(previous, kept))
            raise
        if kept is not None:
            notify(kept_message(previous, kept))
    return replace(outcome, load_seconds=outcome.load_seconds + checked)
