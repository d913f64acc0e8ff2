"""One `train` of a run folder, between the command and the epoch loop: the settings chosen, the
folder locked and the inputs checked before anything moves, the data loaded, loop.train run, and
what a new run set aside or an interrupt left on disk said in one line. Imports torch only when
training starts (`run` that is up to date never does)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Callable, Optional

from mnistsum_cli.errors import Interrupted, MnistsumError
from mnistsum_cli.settings import TrainConfig, describe_preset, preset, preset_for_device
from mnistsum_cli.store.locks import folder_lock
from mnistsum_cli.store.paths import DEFAULT_ARTIFACTS, RunDir
from mnistsum_cli.training.run import Run, aside_folder, epoch_count

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from mnistsum_cli.data.splitdata import SplitData
    from mnistsum_cli.training.distributed import Group
    from mnistsum_cli.training.loop import Reporter

MIN_STEPS_PER_EPOCH = 20  # fewer optimizer steps per epoch and a model barely leaves chance


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


def continue_command(command: str, folder: RunDir) -> str:
    """`mnistsum <command>`, naming the artifacts folder when it is not the default."""
    where = "" if folder.root == DEFAULT_ARTIFACTS else f" --artifacts {folder.root}"
    return f"mnistsum {command}{where}"


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


def kept_message(previous: Optional[Run], kept: Path) -> str:
    """Where the run a new one replaced went, and how to get it back."""
    if previous is None:
        return f"kept the files of the previous run in {kept}"
    if previous.complete:
        return f"kept the previous run ({previous.config.arch}, {epoch_count(previous.epoch)}) in {kept}"
    return (
        f"the artifacts folder held a resumable run (epoch {previous.epoch} of {previous.config.epochs}): "
        f"kept it in {kept}; continue it there with `mnistsum train --resume --artifacts {kept}`"
    )


def interrupted_message(folder: RunDir, continue_with: str, kept: Optional[Path], untouched: bool) -> str:
    """What Ctrl-C left in `folder`, read from the saved state, and what to do next. `kept`: where
    the previous run is; `untouched`: the new run saved nothing, so the previous run never moved."""
    if untouched:
        return f"interrupted before the first epoch was saved: the previous run is still in {folder.root}, unchanged"
    saved = Run.saved(folder)
    previous = f"; the previous run is kept in {kept}" if kept is not None else ""
    if saved is None:
        return "interrupted before the first epoch was saved: no epoch of this run is on disk"
    if saved.complete:
        every = "the only epoch is" if saved.epoch == 1 else f"all {saved.epoch} epochs are"
        return f"interrupted after the last epoch was saved: {every} in {folder.root}{previous}"
    return (
        f"interrupted: epoch {saved.epoch} of {saved.config.epochs} is saved in {folder.root} "
        f"(model.safetensors holds epoch {saved.best_epoch}); continue with `{continue_with}`{previous}"
    )


def run_training(
    config: TrainConfig,
    prepared: SplitData,
    folder: RunDir,
    device: torch.device,
    *,
    resume: bool = False,
    continue_with: Optional[str] = None,
    notify: Callable[[str], None] = lambda message: None,
    reporter: Optional[Reporter] = None,
    group: Optional[Group] = None,
) -> Run:
    """Train a run in `folder`, keeping the user's runs safe: hold the folder's lock, check the
    inputs before anything moves, warn about too few steps per epoch, have the first epoch's
    commit set the previous run aside (saying where), and turn Ctrl-C into a message built from
    what is saved (`continue_with`: the command that continues). Under torchrun (`group`) rank 0
    alone locks, moves runs and speaks. Returns the run, with this call's timings."""
    import torch

    from mnistsum_cli.data.splitdata import check_mnist_matches
    from mnistsum_cli.training.distributed import SINGLE_PROCESS
    from mnistsum_cli.training.loop import SilentReporter, batching, load_train_data, train

    group = group or SINGLE_PROCESS
    continue_with = continue_with or continue_command("train --resume", folder)
    with ExitStack() as held:
        # rank 0 alone writes, so it alone holds the lock; every rank stops when it cannot
        group.agree(
            lambda: held.enter_context(folder_lock(folder.root, "train", "--artifacts")) if group.is_main else None
        )
        started = time.perf_counter()
        rows = len(prepared.dataset.splits["train"])
        check_mnist_matches(prepared.dataset, prepared.any_mnist)  # before the previous run moves
        warning = few_steps_warning(rows, *batching(rows, config))
        if warning is not None:
            notify(warning)
        previous, kept = None, None
        if not resume and group.is_main:
            previous, kept = Run.saved(folder), aside_folder(folder)
        try:
            data = group.agree(lambda: load_train_data(prepared, device))
            loaded = time.perf_counter()
            run = train(
                config,
                data,
                folder,
                device,
                resume=resume,
                reporter=reporter or SilentReporter(),
                group=group,
                aside=kept,
            )
        except BaseException as error:
            moved = kept is not None and kept.exists()
            if isinstance(error, KeyboardInterrupt):
                untouched = kept is not None and not moved
                raise Interrupted(
                    interrupted_message(folder, continue_with, kept if moved else None, untouched)
                ) from None
            if moved:
                notify(kept_message(previous, kept))
            if isinstance(error, torch.cuda.OutOfMemoryError):
                raise MnistsumError(
                    f"{device} ran out of memory with batch size {config.batch_size}: try a smaller --batch-size"
                ) from None
            raise
        if kept is not None:
            notify(kept_message(previous, kept))
    run.load_seconds, run.train_seconds = loaded - started, time.perf_counter() - loaded
    return run
