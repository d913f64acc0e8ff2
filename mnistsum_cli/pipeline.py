"""`status` and `run`: which stages are up to date with their inputs, and running the rest.

Both judge a stage the same way: `status` against the artifacts as they are, `run` against
what its flags ask for, where a flag left out keeps what the artifacts were made with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from mnistsum_cli.artifacts import (
    MODEL_FORMAT,
    SPLITS,
    DataDir,
    Dataset,
    RunDir,
    fingerprint_file,
    plot_inputs,
    read_dataset,
    read_safetensors,
)
from mnistsum_cli.config import TrainConfig
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.mnist import MnistSource, resolve_source
from mnistsum_cli.prepare import DEFAULT_VAL_SIZE, PrepareOptions
from mnistsum_cli.runs import choose_config, continue_command, run_training, saved_run
from mnistsum_cli.schemas import EVALUATION, MODEL_META, PLOTS_MANIFEST, TRAIN_STATE

if TYPE_CHECKING:  # torch, torchvision and matplotlib load only when a stage runs
    import torch

    from mnistsum_cli.train import Reporter

MISSING, CURRENT, STALE, INCOMPLETE, INVALID = "missing", "up to date", "stale", "incomplete", "invalid"


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str
    detail: str
    artifacts: list[str]
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def current(self) -> bool:
        return self.state == CURRENT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_status(data: DataDir, wanted: Optional[PrepareOptions] = None, mnist_fingerprint: Optional[str] = None) -> StageStatus:
    artifacts = [str(data.split(split)) for split in SPLITS]
    if not any(data.split(split).exists() for split in SPLITS):
        return StageStatus("prepare", MISSING, "run `mnistsum prepare`", artifacts)
    try:
        dataset = read_dataset(data)
    except MnistsumError as error:
        return StageStatus("prepare", INVALID, str(error), artifacts)
    meta = dataset.meta
    figures = {"rows": {name: len(rows) for name, rows in dataset.splits.items()}, "seed": meta["seed"]}
    if wanted is not None and not wanted.matches(meta):
        detail = f"made with seed {meta['seed']}, val size {meta['val_size']}, limit {meta['limit']}"
        return StageStatus("prepare", STALE, detail, artifacts, figures)
    if mnist_fingerprint is not None and mnist_fingerprint != meta["mnist_fingerprint"]:
        return StageStatus("prepare", STALE, "made from other MNIST files", artifacts, figures)
    return StageStatus("prepare", CURRENT, f"dataset {meta['dataset_id']}", artifacts, figures)


def train_status(run: RunDir, dataset: Optional[Dataset], wanted: Optional[TrainConfig] = None) -> StageStatus:
    artifacts = [str(path) for path in (run.model, run.history, run.checkpoint, run.config)]
    if not run.train_state.exists():
        return StageStatus("train", MISSING, "run `mnistsum train`", artifacts)
    try:
        counters = TRAIN_STATE.read_json(run.train_state)
        config = TrainConfig.from_dict(counters["config"])
        _, meta = read_safetensors(run.model, stage="train", expected_format=MODEL_FORMAT, metadata_only=True)
        MODEL_META.check(meta, run.model)
    except MnistsumError as error:
        return StageStatus("train", INVALID, str(error), artifacts)
    figures = {
        "arch": config.arch,
        "epochs": counters["epoch"],
        "kept_epoch": meta["epoch"],
        "val_digit_accuracy": meta["val_digit_accuracy"],
        "val_sum_accuracy": meta["val_sum_accuracy"],
    }
    if dataset is None or meta.get("dataset_id") != dataset.dataset_id:
        return StageStatus("train", STALE, "trained on another dataset", artifacts, figures)
    if wanted is not None and wanted != config:
        detail = f"trained with other settings ({', '.join(config.changes_to(wanted))})"
        return StageStatus("train", STALE, detail, artifacts, figures)
    if counters["epoch"] < config.epochs:
        detail = f"stopped after epoch {counters['epoch']} of {config.epochs}: `mnistsum train --resume` or `mnistsum run`"
        return StageStatus("train", INCOMPLETE, detail, artifacts, figures)
    return StageStatus("train", CURRENT, f"{config.arch}, {counters['epoch']} epochs", artifacts, figures)


def evaluate_status(run: RunDir, dataset: Optional[Dataset], split: str = "test") -> StageStatus:
    path = run.evaluation(split)
    if not path.exists():
        return StageStatus("evaluate", MISSING, f"run `mnistsum evaluate --split {split}`", [str(path)])
    try:
        metrics = EVALUATION.read_json(path)
    except MnistsumError as error:
        return StageStatus("evaluate", INVALID, str(error), [str(path)])
    figures = {key: metrics[key] for key in ("split", "digit_accuracy", "sum_accuracy", "consistency")}
    model_sha = metrics["model"]["sha256"]
    if not run.model.exists() or fingerprint_file(run.model) != model_sha:
        return StageStatus("evaluate", STALE, "evaluates an older model", [str(path)], figures)
    if dataset is None or metrics.get("dataset_id") != dataset.dataset_id:
        return StageStatus("evaluate", STALE, "evaluated on another dataset", [str(path)], figures)
    return StageStatus("evaluate", CURRENT, f"{split} split", [str(path)], figures)


def plot_status(run: RunDir) -> StageStatus:
    if not run.plots_manifest.exists():
        return StageStatus("plot", MISSING, "run `mnistsum plot`", [str(run.plots)])
    try:
        manifest = PLOTS_MANIFEST.read_json(run.plots_manifest)
    except MnistsumError as error:
        return StageStatus("plot", INVALID, str(error), [str(run.plots)])
    files = [run.plots / name for name in manifest["files"]]
    inputs = manifest["inputs"]
    artifacts = [str(path) for path in files]
    figures = {"plots": len(files)}
    if not all(path.exists() for path in files):
        return StageStatus("plot", STALE, "some plots are missing", artifacts, figures)
    if inputs != plot_inputs(run):
        return StageStatus("plot", STALE, "drawn from older history or evaluations", artifacts, figures)
    return StageStatus("plot", CURRENT, f"{len(files)} plots", artifacts, figures)


def status(data: DataDir, run: RunDir, split: str = "test") -> list[StageStatus]:
    """Every stage's state, each judged against the artifacts of the stage before it."""
    try:
        dataset: Optional[Dataset] = read_dataset(data)
    except MnistsumError:
        dataset = None
    return [prepare_status(data), train_status(run, dataset), evaluate_status(run, dataset, split), plot_status(run)]


def wanted_prepare_options(data: DataDir, seed: Optional[int], val_size: Optional[int], limit: Optional[int]) -> PrepareOptions:
    """The prepare flags given; each one left out keeps the value the data folder was made
    with (the default when there is no valid dataset)."""
    try:
        meta = read_dataset(data).meta
    except MnistsumError:
        meta = {"seed": 0, "val_size": DEFAULT_VAL_SIZE, "limit": None}
    return PrepareOptions(
        seed=meta["seed"] if seed is None else seed,
        val_size=meta["val_size"] if val_size is None else val_size,
        limit=meta["limit"] if limit is None else limit,
    )


def mnist_source(data: DataDir, mnist_dir: Optional[Path]) -> MnistSource:
    """--mnist-dir when given, else the folder the data in `data` was prepared from, else the
    download folder."""
    try:
        prepared_root: Optional[Path] = Path(read_dataset(data).meta["mnist_root"])
    except MnistsumError:
        prepared_root = None
    return resolve_source(mnist_dir, prepared_root=prepared_root)


def wanted_config(run: RunDir, preset_name: Optional[str], overrides: dict[str, Any], device_type: str) -> tuple[TrainConfig, Optional[str]]:
    """The training settings `run` asks for: the named preset, else the saved run's, else the
    device's preset; flags override. Also a notice when the preset was chosen for the user."""
    saved = saved_run(run)
    return choose_config(preset_name, overrides, device_type, saved.config if saved else None)


def run_pipeline(
    prepare_options: PrepareOptions,
    config: TrainConfig,
    split: str,
    data: DataDir,
    run: RunDir,
    device: torch.device,
    notify: Callable[[str], None],
    reporter: Reporter,
    mnist_dir: Optional[Path] = None,
    force: bool = False,
) -> Iterator[tuple[str, Optional[StageStatus], Any]]:
    """prepare → train → evaluate → plot, skipping stages that are up to date (unless forced).

    Yields (stage, the status that made it skip or None, what the stage returned). Before a
    stage runs, `notify` hears why. An interrupted training run with the same settings is
    resumed; a new run sets the previous one aside.
    """
    from mnistsum_cli.evaluate import evaluate_model
    from mnistsum_cli.mnist import load_mnist
    from mnistsum_cli.plot import plot
    from mnistsum_cli.prepare import prepare

    mnist = load_mnist(mnist_source(data, mnist_dir))

    def train_stage(state: StageStatus) -> Any:
        resume = state.state == INCOMPLETE and not force
        return run_training(
            config, data, run, device, resume=resume, continue_with=continue_command("run", run),
            notify=notify, reporter=reporter, mnist=mnist,
        )  # fmt: skip

    stages = [
        ("prepare", lambda: prepare_status(data, prepare_options, mnist.fingerprint),
         lambda state: prepare(mnist, prepare_options, data)),
        ("train", lambda: train_status(run, read_dataset(data), config), train_stage),
        ("evaluate", lambda: evaluate_status(run, read_dataset(data), split),
         lambda state: evaluate_model(split, data, run, device, mnist=mnist)),
        ("plot", lambda: plot_status(run), lambda state: plot(run, data=data, mnist=mnist)),
    ]  # fmt: skip
    for stage, check, act in stages:
        state = check()
        if force or not state.current:
            notify(why_it_runs(stage, state, force))
            yield stage, None, act(state)
        else:
            yield stage, state, None


def why_it_runs(stage: str, state: StageStatus, force: bool) -> str:
    if force:
        return f"{stage}: --force, running it"
    if state.state == MISSING:
        return f"{stage}: not done yet, running it"
    action = "resuming it" if state.state == INCOMPLETE else "running it"
    return f"{stage}: {state.state}: {state.detail}; {action}"
