"""Every registered architecture: shapes, one training step, safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import model_metadata, save_model, write_safetensors
from mnistsum_cli.data.tensors import normalise
from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.settings import PRESETS
from mnistsum_cli.store.paths import MODEL_FORMAT
from mnistsum_cli.store.tensorfiles import read_safetensors
from mnistsum_cli.training.checkpoint import load_model
from mnistsum_cli.training.models import ARCHITECTURES, build_model

BATCH = 4


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH, 28, 28), dtype=torch.uint8, generator=generator)
    digits = torch.randint(0, 10, (BATCH,), generator=generator)
    numbers = torch.randint(0, 10, (BATCH,), generator=generator)
    return normalise(images), numbers, digits, digits + numbers


def test_registry_has_every_preset_and_the_seeds() -> None:
    assert {config.arch for config in PRESETS.values()} <= set(ARCHITECTURES)
    assert {"lenet", "convnet"} <= set(ARCHITECTURES)


def test_unknown_architecture() -> None:
    with pytest.raises(MnistsumError, match="fastnet"):
        build_model("resnet-9000")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_forward_shapes_and_one_step(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch)
    images, numbers, digits, sums = _batch()
    model.train()
    digit_logits, sum_logits = model(images, numbers)
    assert digit_logits.shape == (BATCH, 10)
    assert sum_logits.shape == (BATCH, 19)
    assert digit_logits.dtype == sum_logits.dtype == torch.float32

    loss = nn.functional.cross_entropy(digit_logits, digits) + nn.functional.cross_entropy(sum_logits, sums)
    assert torch.isfinite(loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.zero_grad()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    optimizer.step()
    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p)]
    assert changed, "one optimizer step changed no parameter"
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
    # the model still works after the step, and in eval mode on a single image
    model.eval()
    with torch.no_grad():
        digit_logits, sum_logits = model(images[:1], numbers[:1])
    assert digit_logits.shape == (1, 10) and sum_logits.shape == (1, 19)
    assert torch.isfinite(digit_logits).all() and torch.isfinite(sum_logits).all()
    # the sum head sees the number: changing only the number changes the sum logits (after
    # one step; a zero-initialised sum head starts out constant)
    with torch.no_grad():
        _, with_numbers = model(images, numbers)
        _, with_other_numbers = model(images, (numbers + 3) % 10)
    assert not torch.allclose(with_numbers, with_other_numbers)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_save_load_round_trip(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model(arch)
    images, numbers, digits, sums = _batch(2)
    # one training step so weights and BatchNorm statistics differ from a fresh model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    digit_logits, sum_logits = model(images, numbers)
    (nn.functional.cross_entropy(digit_logits, digits) + nn.functional.cross_entropy(sum_logits, sums)).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(images, numbers)

    path = tmp_path / "model.safetensors"
    save_model(path, model, model_metadata(arch))
    loaded, meta = load_model(path, torch.device("cpu"))
    assert meta["arch"] == arch and meta["epoch"] == 1 and meta["dataset_id"] == "abc"
    assert meta["format"] == MODEL_FORMAT
    assert not loaded.training, "load_model must return the model in eval mode"
    assert type(loaded) is type(model)
    with torch.no_grad():
        got = loaded(images, numbers)
    assert torch.equal(expected[0], got[0])
    assert torch.equal(expected[1], got[1])

    # buffers (BatchNorm running statistics) travel too
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_load_model_refuses_weights_of_another_arch(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(path, build_model("fastnet-small"), model_metadata("lenet"))
    with pytest.raises(MnistsumError, match="does not fit architecture 'lenet'.*mnistsum train"):
        load_model(path, torch.device("cpu"))


def test_load_model_refuses_unknown_arch(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(path, build_model("fastnet-small"), model_metadata("no-such-arch"))
    with pytest.raises(MnistsumError, match="arch is 'no-such-arch', expected one of fastnet"):
        load_model(path, torch.device("cpu"))


def test_load_model_refuses_missing_arch(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, build_model("fastnet-small").state_dict(), {"format": MODEL_FORMAT})
    with pytest.raises(MnistsumError):
        load_model(path, torch.device("cpu"))


def test_load_model_refuses_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    write_safetensors(
        path, build_model("fastnet-small").state_dict(), {"format": "mnistsum-checkpoint/1", "arch": "fastnet-small"}
    )
    with pytest.raises(MnistsumError, match=MODEL_FORMAT):
        load_model(path, torch.device("cpu"))
    tensors, meta = read_safetensors(path, "train", "mnistsum-checkpoint/1")
    assert meta["arch"] == "fastnet-small" and tensors


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_sum_head_runs_in_fp32_under_autocast(arch: str) -> None:
    """bf16 rounds the scaled sum logits into ties: the sum head stays fp32 under autocast."""
    model = build_model(arch).eval()
    images, numbers, _, _ = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        digit_logits, sum_logits = model(images, numbers)
    assert sum_logits.dtype == torch.float32
    assert digit_logits.dtype == torch.bfloat16, "autocast did not engage: the test would prove nothing"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_channels_last_gives_the_same_outputs(arch: str) -> None:
    """Training runs channels_last, `load_model` does not: both layouts must compute the same function."""
    torch.manual_seed(0)
    model = build_model(arch).eval()
    images, numbers, _, _ = _batch()
    with torch.no_grad():
        expected = model(images, numbers)
        model = model.to(memory_format=torch.channels_last)
        got = model(images.contiguous(memory_format=torch.channels_last), numbers)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_architecture_names_match_the_registry() -> None:
    """config.ARCHITECTURE_NAMES lets the CLI check --arch without importing torch."""
    from mnistsum_cli.settings import ARCHITECTURE_NAMES

    assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES
