"""Stage 2 through the library API: determinism, exact resume, what the run folder holds."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from conftest import VAL_SIZE, FakeMnist, leftovers
from mnistsum_cli.data.mnist import load_mnist, resolve_source
from mnistsum_cli.data.prepare import PrepareOptions, prepare
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.settings import PRESETS, TrainConfig
from mnistsum_cli.store.paths import CHECKPOINT_FORMAT, MODEL_FORMAT, DataDir, RunDir
from mnistsum_cli.store.tensorfiles import read_safetensors
from mnistsum_cli.training.checkpoint import load_model, model_weights
from mnistsum_cli.training.loop import TrainData, load_train_data, lr_at, train
from mnistsum_cli.training.run import Run

CPU = torch.device("cpu")
CONFIG = TrainConfig(arch="fastnet-small", epochs=3, batch_size=64, lr=4e-3, max_shift=2, seed=0)


@pytest.fixture(scope="module")
def train_data(fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    mnist = load_mnist(resolve_source(fake_mnist.root))
    data_dir = DataDir(tmp_path_factory.mktemp("train_data") / "data")
    prepare(mnist, PrepareOptions(seed=0, val_size=VAL_SIZE), data_dir)
    return load_train_data(SplitData(data_dir, mnist=mnist), CPU)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    different = [name for name in ta if not (ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]))]
    assert not different, f"{len(different)} tensors differ between {a} and {b}, e.g. {different[:5]}"


def any_tensor_differs(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return any(not torch.equal(ta[name], tb[name]) for name in ta)


class InterruptAfter:
    """A reporter that presses Ctrl-C when epoch `epoch` ends."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.started: list[tuple[int, int, int, int]] = []
        self.steps = 0
        self.ended: list[int] = []

    def epoch_start(self, epoch: int, epochs: int, steps: int, batch_size: int) -> None:
        self.started.append((epoch, epochs, steps, batch_size))

    def step(self) -> None:
        self.steps += 1

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.ended.append(record["epoch"])
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


class Recorder(InterruptAfter):
    def __init__(self) -> None:
        super().__init__(epoch=-1)


@pytest.fixture(scope="module")
def straight_run(train_data: TrainData, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, Run, Recorder]:
    """CONFIG trained for all its epochs without interruption (shared, read-only)."""
    run = RunDir(tmp_path_factory.mktemp("straight") / "artifacts")
    reporter = Recorder()
    state = train(CONFIG, train_data, run, CPU, reporter=reporter)
    return run, state, reporter


def test_run_folder_contents(straight_run) -> None:
    run, state, _ = straight_run
    for path in (run.model, run.checkpoint, run.history, run.train_state, run.setup_file):
        assert path.is_file() and path.stat().st_size > 0, path
    assert not leftovers(run.root)
    assert state.epoch == CONFIG.epochs
    assert len(state.history) == CONFIG.epochs


def test_reporter_protocol(straight_run, train_data: TrainData) -> None:
    _, _, reporter = straight_run
    steps = len(train_data.train) // CONFIG.batch_size
    assert reporter.started == [
        (epoch, CONFIG.epochs, steps, CONFIG.batch_size) for epoch in range(1, CONFIG.epochs + 1)
    ]
    assert reporter.steps == steps * CONFIG.epochs
    assert reporter.ended == list(range(1, CONFIG.epochs + 1))


def test_same_seed_gives_identical_weights(straight_run, train_data: TrainData, tmp_path: Path) -> None:
    run_a, state_a, _ = straight_run
    run_b = RunDir(tmp_path / "b")
    state_b = train(CONFIG, train_data, run_b, CPU)
    assert_same_tensors(run_a.model, run_b.model)
    assert_same_tensors(run_a.checkpoint, run_b.checkpoint)
    assert state_a.best_epoch == state_b.best_epoch
    for ra, rb in zip(state_a.history, state_b.history):
        for key in ("train_loss", "val_loss", "val_digit_accuracy", "val_sum_accuracy"):
            assert ra[key] == rb[key], key
    assert state_a.run_id != state_b.run_id


def test_other_seed_gives_other_weights(straight_run, train_data: TrainData, tmp_path: Path) -> None:
    run_a, _, _ = straight_run
    run_b = RunDir(tmp_path / "b")
    train(TrainConfig(**{**CONFIG.to_dict(), "seed": 1}), train_data, run_b, CPU)
    assert any_tensor_differs(run_a.checkpoint, run_b.checkpoint)


def test_interrupt_then_resume_equals_uninterrupted(straight_run, train_data: TrainData, tmp_path: Path) -> None:
    run_a, state_a, _ = straight_run
    run_b = RunDir(tmp_path / "b")

    with pytest.raises(KeyboardInterrupt):
        train(CONFIG, train_data, run_b, CPU, reporter=InterruptAfter(epoch=2))
    # what is on disk is the end of epoch 2, complete
    assert _metadata(run_b.checkpoint)["epoch"] == 2
    assert json.loads(run_b.train_state.read_text())["epoch"] == 2
    assert len(json.loads(run_b.history.read_text())["epochs"]) == 2
    assert not leftovers(run_b.root)

    reporter = Recorder()
    state_b = train(CONFIG, train_data, run_b, CPU, resume=True, reporter=reporter)
    assert reporter.ended == [3], "resume must run only the missing epoch"
    assert state_b.epoch == CONFIG.epochs
    assert_same_tensors(run_a.checkpoint, run_b.checkpoint)
    assert_same_tensors(run_a.model, run_b.model)
    assert state_b.best_epoch == state_a.best_epoch
    assert [r["epoch"] for r in state_b.history] == [1, 2, 3]
    for ra, rb in zip(state_a.history, state_b.history):
        assert ra["val_loss"] == rb["val_loss"]
        assert ra["train_loss"] == rb["train_loss"]
    history_b = json.loads(run_b.history.read_text())
    assert [r["epoch"] for r in history_b["epochs"]] == [1, 2, 3]


def test_interrupt_after_first_epoch_then_resume(straight_run, train_data: TrainData, tmp_path: Path) -> None:
    run_a, _, _ = straight_run
    run_b = RunDir(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(CONFIG, train_data, run_b, CPU, reporter=InterruptAfter(epoch=1))
    train(CONFIG, train_data, run_b, CPU, resume=True)
    assert_same_tensors(run_a.checkpoint, run_b.checkpoint)


def test_resume_refuses_other_settings(straight_run, train_data: TrainData, tmp_path: Path) -> None:
    import shutil

    run_a, _, _ = straight_run
    run_b = RunDir(tmp_path / "b")
    shutil.copytree(run_a.root, run_b.root)
    before = {p.name: p.read_bytes() for p in run_b.root.iterdir()}
    with pytest.raises(MnistsumError, match="lr"):
        train(TrainConfig(**{**CONFIG.to_dict(), "lr": 0.5}), train_data, run_b, CPU, resume=True)
    assert {p.name: p.read_bytes() for p in run_b.root.iterdir()} == before


def test_resume_refuses_other_dataset(straight_run, train_data: TrainData, tmp_path: Path) -> None:
    import shutil

    run_a, _, _ = straight_run
    run_b = RunDir(tmp_path / "b")
    shutil.copytree(run_a.root, run_b.root)
    other = TrainData(train=train_data.train, val=train_data.val, dataset_id="0123456789abcdef")
    with pytest.raises(MnistsumError, match="dataset"):
        train(CONFIG, other, run_b, CPU, resume=True)


def test_resume_with_nothing_saved(train_data: TrainData, tmp_path: Path) -> None:
    with pytest.raises(MnistsumError, match="mnistsum train"):
        train(CONFIG, train_data, RunDir(tmp_path / "empty"), CPU, resume=True)


def test_model_metadata(straight_run, train_data: TrainData) -> None:
    run, state, _ = straight_run
    tensors, meta = read_safetensors(run.model, "train", MODEL_FORMAT)
    assert meta["format"] == MODEL_FORMAT
    assert meta["arch"] == CONFIG.arch
    assert meta["config"] == CONFIG.to_dict()
    assert meta["dataset_id"] == train_data.dataset_id
    assert meta["epoch"] == state.best_epoch
    assert meta["run_id"] == state.run_id
    best = state.history[state.best_epoch - 1]
    assert meta["val_sum_accuracy"] == best["val_sum_accuracy"]
    assert meta["val_digit_accuracy"] == best["val_digit_accuracy"]
    # the weights are loadable by the package's own loader
    model, _ = load_model(run.model, CPU)
    assert set(model.state_dict()) == set(tensors)

    _, checkpoint_meta = read_safetensors(run.checkpoint, "train", CHECKPOINT_FORMAT)
    assert checkpoint_meta["epoch"] == CONFIG.epochs
    assert checkpoint_meta["run_id"] == state.run_id
    assert any(name.startswith("optim.") for name in _tensors(run.checkpoint))


def test_kept_epoch_is_the_best_on_validation(straight_run) -> None:
    run, state, _ = straight_run
    records = json.loads(run.history.read_text())["epochs"]
    best = max(range(len(records)), key=lambda i: (records[i]["val_sum_accuracy"], records[i]["val_digit_accuracy"], i))
    assert state.best_epoch == best + 1
    assert _metadata(run.model)["epoch"] == best + 1
    kept = _tensors(run.model)
    last = model_weights(_tensors(run.checkpoint))
    assert set(kept) == set(last)
    same_as_last = all(torch.equal(kept[name], last[name]) for name in kept)
    assert same_as_last == (best + 1 == CONFIG.epochs)


def test_history_json(straight_run, train_data: TrainData) -> None:
    run, state, _ = straight_run
    history = json.loads(run.history.read_text())
    assert history["run_id"] == state.run_id
    assert history["dataset_id"] == train_data.dataset_id
    assert history["config"] == CONFIG.to_dict()
    assert history["best_epoch"] == state.best_epoch
    records = history["epochs"]
    assert [r["epoch"] for r in records] == list(range(1, CONFIG.epochs + 1))
    for record in records:
        for split in ("train", "val"):
            for key in ("loss", "digit_loss", "sum_loss"):
                value = record[f"{split}_{key}"]
                assert math.isfinite(value) and value >= 0, (split, key, value)
            assert record[f"{split}_loss"] == pytest.approx(record[f"{split}_digit_loss"] + record[f"{split}_sum_loss"])
            for key in ("digit_accuracy", "sum_accuracy"):
                assert 0.0 <= record[f"{split}_{key}"] <= 1.0
    # the fake digits are easy: training must actually learn them
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert max(r["val_digit_accuracy"] for r in records) > 0.3

    state_file = json.loads(run.train_state.read_text())
    assert state_file["epoch"] == CONFIG.epochs and state_file["best_epoch"] == state.best_epoch
    config_file = json.loads(run.setup_file.read_text())
    assert config_file["config"] == CONFIG.to_dict()
    assert config_file["run_id"] == state.run_id


# --------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("total, warmup", [(100, 0.2), (37, 0.3), (10, 0.0), (2, 0.2)])
def test_lr_is_one_cycle(total: int, warmup: float) -> None:
    config = TrainConfig(lr=4e-3, warmup=warmup)
    values = [lr_at(step, total, config) for step in range(total)]
    assert all(0.0 <= v <= config.lr * (1 + 1e-9) for v in values)
    peak = max(range(total), key=lambda i: values[i])
    assert values[peak] == pytest.approx(config.lr)
    assert all(a <= b + 1e-15 for a, b in zip(values[:peak], values[1 : peak + 1])), "not rising to the peak"
    assert all(a >= b - 1e-15 for a, b in zip(values[peak:], values[peak + 1 :])), "not falling after the peak"
    if total >= 10:
        assert values[0] < config.lr / 2 or warmup == 0.0
        assert values[-1] < (0.02 if total >= 100 else 0.15) * config.lr, "does not fall to ~0"
        assert abs(peak - warmup * total) <= 1.5
    assert lr_at(total, total, config) == pytest.approx(0.0, abs=1e-12)


def test_presets_are_valid_configs() -> None:
    from mnistsum_cli.training.models import ARCHITECTURES

    for name, config in PRESETS.items():
        assert config.arch in ARCHITECTURES, name
        assert config.epochs >= 1 and config.batch_size >= 1 and config.lr > 0, name
        assert TrainConfig.from_dict(config.to_dict()) == config


# --------------------------------------------------------------------------- the fused AdamW kernel


def test_fused_resume_equals_uninterrupted(train_data: TrainData, tmp_path: Path) -> None:
    """Resumed optimizer moments must take their channels_last parameters' layout: the fused
    kernel pairs elements by memory order (on CUDA it refuses mixed layouts outright)."""
    assert CONFIG.channels_last
    straight, resumed = RunDir(tmp_path / "straight"), RunDir(tmp_path / "resumed")
    train(CONFIG, train_data, straight, CPU)
    with pytest.raises(KeyboardInterrupt):
        train(CONFIG, train_data, resumed, CPU, reporter=InterruptAfter(epoch=1))
    train(CONFIG, train_data, resumed, CPU, resume=True)
    assert _metadata(straight.checkpoint)["param_groups"][0]["fused"] is True
    assert_same_tensors(straight.checkpoint, resumed.checkpoint)
    assert_same_tensors(straight.model, resumed.model)


def _adamw(fused: bool) -> torch.optim.Optimizer:
    from mnistsum_cli.training.models import build_model

    model = build_model("fastnet-small").to(memory_format=torch.channels_last)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)


def _saved_state(fused: bool) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The checkpoint tensors and param groups of an AdamW that took one step."""
    from mnistsum_cli.training.checkpoint import optimizer_tensors

    saved = _adamw(fused)
    for param in saved.param_groups[0]["params"]:
        param.grad = torch.ones_like(param)
    saved.step()
    tensors, groups = optimizer_tensors(saved)
    return {name: tensor.contiguous() for name, tensor in tensors.items()}, groups  # as safetensors gives them back


@pytest.mark.parametrize("saved_fused, live_fused", [(False, True), (True, False)])
def test_resume_keeps_the_live_optimizer_kernel(saved_fused: bool, live_fused: bool) -> None:
    """A checkpoint moves between devices: its saved fused/foreach/capturable flags must not
    replace the live optimizer's, and its moments take the live parameters' layout."""
    from mnistsum_cli.training.checkpoint import load_optimizer

    tensors, groups = _saved_state(saved_fused)
    live = _adamw(live_fused)
    load_optimizer(live, tensors, groups, Path("checkpoint.safetensors"))
    assert live.param_groups[0]["fused"] is live_fused
    assert live.param_groups[0]["foreach"] is None and live.param_groups[0]["capturable"] is False
    for param, state in live.state.items():
        assert state["exp_avg"].stride() == param.stride() and state["exp_avg_sq"].stride() == param.stride()


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("flatten", r"optim\.0\.exp_avg has shape \[\d+\], its parameter \[\d+, \d+, \d+, \d+\]"),
        ("extra", "optimizer state of parameter 999, which no group holds"),
        ("fewer", r"optimizer groups of \[\d+\] parameters, the model's \[\d+\]"),
    ],
)
def test_resume_refuses_optimizer_state_that_does_not_fit_the_model(damage: str, reason: str) -> None:
    """Optimizer moments of other shapes (another version, damage) are one line before training
    starts, not a torch error in the middle of the first step."""
    from mnistsum_cli.training.checkpoint import load_optimizer

    tensors, groups = _saved_state(fused=True)
    if damage == "flatten":
        tensors["optim.0.exp_avg"] = tensors["optim.0.exp_avg"].flatten()
    elif damage == "extra":
        tensors["optim.999.exp_avg"] = torch.zeros(3)
    else:
        groups[0]["params"] = groups[0]["params"][:-1]
    with pytest.raises(MnistsumError, match="checkpoint.safetensors is not a checkpoint of this model") as refused:
        load_optimizer(_adamw(True), tensors, groups, Path("checkpoint.safetensors"))
    assert re.search(reason, str(refused.value)), refused.value
    assert "rerun `mnistsum train` without --resume" in str(refused.value)


@pytest.mark.parametrize("diverges_in", [1, 2])
def test_a_nan_loss_stops_the_run_keeping_the_epochs_saved_before(
    diverges_in: int, train_data: TrainData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights that turn NaN (a diverging run) stop training at the end of that epoch, with a
    message naming it; the epochs saved before stay the run's state, nothing of it is written."""
    import mnistsum_cli.training.loop

    built: list[torch.nn.Module] = []
    real_build = mnistsum_cli.training.loop.build_model
    monkeypatch.setattr(
        mnistsum_cli.training.loop, "build_model", lambda arch: built.append(real_build(arch)) or built[-1]
    )

    class Diverging(Recorder):
        def epoch_start(self, epoch: int, epochs: int, steps: int, batch_size: int) -> None:
            super().epoch_start(epoch, epochs, steps, batch_size)
            if epoch == diverges_in:
                with torch.no_grad():
                    next(built[0].parameters()).fill_(math.nan)

    run = RunDir(tmp_path / "artifacts")
    reporter = Diverging()
    with pytest.raises(MnistsumError, match=rf"^epoch {diverges_in}: the train loss is nan \(training diverged\)"):
        train(CONFIG, train_data, run, CPU, reporter=reporter)
    assert reporter.ended == list(range(1, diverges_in))
    if diverges_in == 1:
        assert not run.train_state.exists() and not run.history.exists()
    else:
        assert json.loads(run.train_state.read_text())["epoch"] == diverges_in - 1
        assert len(json.loads(run.history.read_text())["epochs"]) == diverges_in - 1
        assert not leftovers(run.root)
