"""`status` and `run`: which stages are up to date with their inputs, and running the rest.

Both judge a stage the same way: `status` against the artifacts as they are, `run` against
what its flags ask for, where a flag left out keeps what the artifacts were made with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from mnistsum_cli.data.prepare import DEFAULT_VAL_SIZE, PrepareOptions, prepare
from mnistsum_cli.data.splitdata import DatasetHeader, SplitData
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.settings import TrainConfig
from mnistsum_cli.store.diskfiles import each_file_read_once, read_file
from mnistsum_cli.store.fingerprints import fingerprint_file, plot_inputs
from mnistsum_cli.store.locks import folder_lock
from mnistsum_cli.store.paths import SPLITS, RunDir
from mnistsum_cli.store.reads import read_consistently
from mnistsum_cli.store.schemas import EVALUATION, MODEL_META, ONNX_META, PLOTS_MANIFEST
from mnistsum_cli.training.run import Run, epoch_count, evaluates, model_meta
from mnistsum_cli.training.session import choose_config, continue_command, run_training

if TYPE_CHECKING:  # torch, torchvision and matplotlib load only when a stage runs
    import torch

    from mnistsum_cli.training.loop import Reporter

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


def prepare_status(
    prepared: SplitData, wanted: Optional[PrepareOptions] = None, check_mnist: bool = False
) -> StageStatus:
    """The splits' state from their metadata; `check_mnist`: also whether MNIST changed since."""
    folder = prepared.folder
    artifacts = [str(folder.split(split)) for split in SPLITS]
    if not any(folder.split(split).exists() for split in SPLITS):
        return StageStatus("prepare", MISSING, "run `mnistsum prepare`", artifacts)
    try:
        # the rows too, not only the header (milliseconds): edited rows no longer match the dataset id
        dataset = prepared.dataset
    except MnistsumError as error:
        return StageStatus("prepare", INVALID, str(error), artifacts)
    meta = dataset.meta
    figures = {"rows": {name: len(split) for name, split in dataset.splits.items()}, "seed": meta["seed"]}
    if wanted is not None and not wanted.matches(meta):
        detail = f"made with seed {meta['seed']}, val size {meta['val_size']}, limit {meta['limit']}"
        return StageStatus("prepare", STALE, detail, artifacts, figures)
    if check_mnist and not prepared.mnist_unchanged():
        return StageStatus("prepare", STALE, "made from other MNIST files", artifacts, figures)
    return StageStatus("prepare", CURRENT, f"dataset {meta['dataset_id']}", artifacts, figures)


def train_status(run_dir: RunDir, header: Optional[DatasetHeader], wanted: Optional[TrainConfig] = None) -> StageStatus:
    artifacts = [str(path) for path in (run_dir.model, run_dir.history, run_dir.checkpoint, run_dir.setup_file)]
    if not run_dir.train_state.exists():
        return StageStatus("train", MISSING, "run `mnistsum train`", artifacts)
    try:
        run = Run.load(run_dir)
        meta = model_meta(run_dir)
    except MnistsumError as error:
        return StageStatus("train", INVALID, str(error), artifacts)
    figures = {
        "arch": run.config.arch,
        "epochs": run.epoch,
        "kept_epoch": meta["epoch"],
        "val_digit_accuracy": meta["val_digit_accuracy"],
        "val_sum_accuracy": meta["val_sum_accuracy"],
    }
    if header is None or meta.get("dataset_id") != header.dataset_id:
        return StageStatus("train", STALE, "trained on another dataset", artifacts, figures)
    if wanted is not None and wanted != run.config:
        detail = f"trained with other settings ({', '.join(run.config.changes_to(wanted))})"
        return StageStatus("train", STALE, detail, artifacts, figures)
    if not run.complete:
        detail = f"stopped after epoch {run.epoch} of {run.config.epochs}: `mnistsum train --resume` or `mnistsum run`"
        return StageStatus("train", INCOMPLETE, detail, artifacts, figures)
    return StageStatus("train", CURRENT, f"{run.config.arch}, {epoch_count(run.epoch)}", artifacts, figures)


def evaluate_status(run_dir: RunDir, header: Optional[DatasetHeader], split: str = "test") -> StageStatus:
    path = run_dir.evaluation(split)
    if not path.exists():
        return StageStatus("evaluate", MISSING, f"run `mnistsum evaluate --split {split}`", [str(path)])
    try:
        metrics = EVALUATION.read_json(path)
    except MnistsumError as error:
        return StageStatus("evaluate", INVALID, str(error), [str(path)])
    figures = {key: metrics[key] for key in ("split", "digit_accuracy", "sum_accuracy", "consistency")}
    try:
        current_model = fingerprint_file(run_dir.model, MODEL_META) if run_dir.model.exists() else None
    except MnistsumError as error:
        return StageStatus("evaluate", STALE, f"the model cannot be read: {error}", [str(path)], figures)
    if not evaluates(metrics, current_model):
        return StageStatus("evaluate", STALE, "evaluates an older model", [str(path)], figures)
    if header is None or metrics.get("dataset_id") != header.dataset_id:
        return StageStatus("evaluate", STALE, "evaluated on another dataset", [str(path)], figures)
    return StageStatus("evaluate", CURRENT, f"{split} split", [str(path)], figures)


def plot_status(run_dir: RunDir) -> StageStatus:
    if not run_dir.plots_manifest.exists():
        return StageStatus("plot", MISSING, "run `mnistsum plot`", [str(run_dir.plots)])
    try:
        manifest = PLOTS_MANIFEST.read_json(run_dir.plots_manifest)
    except MnistsumError as error:
        return StageStatus("plot", INVALID, str(error), [str(run_dir.plots)])
    files = [run_dir.plots / name for name in manifest["files"]]
    inputs = manifest["inputs"]
    artifacts = [str(path) for path in files]
    figures = {"plots": len(files)}
    if not all(path.exists() for path in files):
        return StageStatus("plot", STALE, "some plots are missing", artifacts, figures)
    try:
        current_inputs = plot_inputs(run_dir)
    except MnistsumError as error:
        return StageStatus("plot", STALE, f"an input cannot be read: {error}", artifacts, figures)
    if inputs != current_inputs:
        return StageStatus("plot", STALE, "drawn from older history or evaluations", artifacts, figures)
    return StageStatus("plot", CURRENT, f"{len(files)} plots", artifacts, figures)


def export_status(run_dir: RunDir) -> Optional[StageStatus]:
    """model.onnx's state, or None when there is none (export is the optional stage: `status`
    shows it once a model was exported). Current when it is the export of model.safetensors."""
    from mnistsum_cli.evaluation.onnx_runtime import onnx_metadata, stale_reason

    path = run_dir.onnx
    if not path.exists():
        return None
    try:
        meta = onnx_metadata(read_file(path, ONNX_META.max_bytes, "export"), path)
        model_sha256 = fingerprint_file(run_dir.model, MODEL_META) if run_dir.model.exists() else None
    except MnistsumError as error:
        return StageStatus("export", INVALID, str(error), [str(path)])
    figures = {"arch": meta["arch"], "opset": meta["opset"], "check": meta["check"]}
    reason = stale_reason(meta, model_sha256, run_dir)
    if reason is not None:
        return StageStatus("export", STALE, f"{reason}: `mnistsum export`", [str(path)], figures)
    return StageStatus("export", CURRENT, f"model {meta['model_sha256']}, opset {meta['opset']}", [str(path)], figures)


def dataset_header(prepared: SplitData) -> Optional[DatasetHeader]:
    """The splits' header, or None when there are no valid splits."""
    try:
        return prepared.header
    except MnistsumError:
        return None


def status(prepared: SplitData, run_dir: RunDir, split: str = "test") -> list[StageStatus]:
    """Every stage's state, each judged against the artifacts of the stage before it. Each
    folder is read between commits (a `train` running meanwhile never shows a mix of epochs),
    and each file once."""
    with each_file_read_once():
        header = dataset_header(prepared)

        def run_stages() -> list[StageStatus]:
            exported = export_status(run_dir)
            stages = [train_status(run_dir, header), evaluate_status(run_dir, header, split), plot_status(run_dir)]
            return stages + ([exported] if exported is not None else [])

        return [prepare_status(prepared)] + read_consistently(run_dir.root, run_stages)


def wanted_prepare_options(
    prepared: SplitData, seed: Optional[int], val_size: Optional[int], limit: Optional[int]
) -> PrepareOptions:
    """The prepare flags given; each one left out keeps the value the data folder was made
    with (the default when there is no valid dataset)."""
    header = dataset_header(prepared)
    meta = header.meta if header is not None else {"seed": 0, "val_size": DEFAULT_VAL_SIZE, "limit": None}
    return PrepareOptions(
        seed=meta["seed"] if seed is None else seed,
        val_size=meta["val_size"] if val_size is None else val_size,
        limit=meta["limit"] if limit is None else limit,
    )


def wanted_config(
    run_dir: RunDir, preset_name: Optional[str], overrides: dict[str, Any], device_type: Callable[[], str]
) -> tuple[TrainConfig, Optional[str]]:
    """The training settings `run` asks for: the named preset, else the saved run's, else the
    device's preset; flags override. Also a notice when the preset was chosen for the user."""
    saved = Run.saved(run_dir)
    return choose_config(preset_name, overrides, device_type, saved.config if saved else None)


def run_pipeline(
    prepare_options: PrepareOptions,
    config: TrainConfig,
    split: str,
    prepared: SplitData,
    run_dir: RunDir,
    device: Callable[[], torch.device],
    notify: Callable[[str], None],
    reporter: Reporter,
    force: bool = False,
    export: bool = False,
) -> Iterator[tuple[str, Optional[StageStatus], Any]]:
    """prepare → train → evaluate → plot (→ export, when asked), skipping stages that are up to
    date (unless forced).

    Yields (stage, the status that made it skip or None, what the stage returned). Before a
    stage runs, `notify` hears why. An interrupted training run with the same settings is
    resumed; a new run sets the previous one aside. The splits and MNIST are read once (and
    the splits again after `prepare` rewrote them); `device()` is asked only when a stage
    needs it. Holds both folders' locks throughout.
    """
    with folder_lock(prepared.folder.root, "run", "--data"), folder_lock(run_dir.root, "run", "--artifacts"):

        def prepare_stage(status: StageStatus) -> Any:
            nonlocal prepared
            columns = prepare(prepared.any_mnist, prepare_options, prepared.folder)
            prepared = prepared.rewritten()
            return columns

        def train_stage(status: StageStatus) -> Any:
            resume = status.state == INCOMPLETE and not force
            return run_training(
                config,
                prepared,
                run_dir,
                device(),
                resume=resume,
                continue_with=continue_command("run", run_dir),
                notify=notify,
                reporter=reporter,
            )

        # evaluate and plot import their modules when they run: an up-to-date `run` loads no torch
        def evaluate_stage(status: StageStatus) -> Any:
            from mnistsum_cli.evaluation.evaluate import evaluate_model

            return evaluate_model(split, prepared, run_dir, device())

        def plot_stage(status: StageStatus) -> Any:
            from mnistsum_cli.evaluation.plot import plot

            return plot(run_dir, prepared=prepared)

        def export_stage(status: Optional[StageStatus]) -> Any:
            from mnistsum_cli.evaluation.onnx_runtime import onnx_extra

            with onnx_extra("run --export"):
                from mnistsum_cli.export import export_model

                return export_model(run_dir, prepared, None, None)

        stages = [
            ("prepare", lambda: prepare_status(prepared, prepare_options, check_mnist=True), prepare_stage),
            ("train", lambda: train_status(run_dir, dataset_header(prepared), config), train_stage),
            ("evaluate", lambda: evaluate_status(run_dir, dataset_header(prepared), split), evaluate_stage),
            ("plot", lambda: plot_status(run_dir), plot_stage),
        ] + ([("export", lambda: export_status(run_dir), export_stage)] if export else [])
        for stage, check, act in stages:
            status = check()
            if force or status is None or not status.current:
                notify(why_it_runs(stage, status, force))
                yield stage, None, act(status)
            else:
                yield stage, status, None


def why_it_runs(stage: str, status: Optional[StageStatus], force: bool) -> str:
    if force:
        return f"{stage}: --force, running it"
    if status is None or status.state == MISSING:
        return f"{stage}: not done yet, running it"
    action = "resuming it" if status.state == INCOMPLETE else "running it"
    return f"{stage}: {status.state}: {status.detail}; {action}"
