"""`mnistsum export`: the run's kept model as model.onnx, checked against torch before it is written.

The graph is the model with the normalisation in front of it (MNIST-form uint8 pixels in) and
both heads' softmax behind it, exported by torch.onnx (dynamo) with a dynamic batch axis, the
weights inside the one file. Before anything is written, onnxruntime and torch run the whole
test split: every row must get the same digit and sum from both, and no probability may differ
by more than AGREEMENT_TOLERANCE; a graph that fails is refused. The file is written by a commit
of the artifacts folder (store.py), as every artifact is, and only when the model.safetensors it
came from is still the current one.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from mnistsum_cli import __version__
from mnistsum_cli.data.splitdata import SplitData
from mnistsum_cli.errors import BadOption, MnistsumError, first_line
from mnistsum_cli.evaluation.onnx_runtime import (
    INPUT_NAMES,
    INPUTS_TEXT,
    OUTPUT_NAMES,
    OUTPUTS_TEXT,
    OnnxModel,
    current_onnx_model,
    graph_fingerprint,
    onnx_session,
    require_extra,
)
from mnistsum_cli.store.diskfiles import read_file
from mnistsum_cli.store.fingerprints import fingerprint_bytes, fingerprint_file, now_iso
from mnistsum_cli.store.paths import ONNX_FORMAT, RunDir
from mnistsum_cli.store.reads import read_consistently
from mnistsum_cli.store.schemas import MODEL_META
from mnistsum_cli.store.transactions import commit
from mnistsum_cli.store.writes import replace_file
from mnistsum_cli.training.inference import EVAL_BATCH_SIZE

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch
    from torch import nn

AGREEMENT_TOLERANCE = 1e-4  # the largest |p_onnx - p_torch| of any probability on the test split
MIN_OPSET = 18  # the oldest opset torch's dynamo exporter writes


@dataclass(frozen=True)
class Agreement:
    """How onnxruntime's answers compare with torch's on a split."""

    rows: int
    digit_mismatches: int  # rows whose most likely digit differs
    sum_mismatches: int
    max_difference: float  # the largest |Δp| of any probability

    @property
    def passed(self) -> bool:
        return self.digit_mismatches == 0 and self.sum_mismatches == 0 and self.max_difference <= AGREEMENT_TOLERANCE

    def text(self, split: str) -> str:
        argmax = (
            "identical digit and sum on every row"
            if not (self.digit_mismatches or self.sum_mismatches)
            else f"{self.digit_mismatches} rows with another digit, {self.sum_mismatches} with another sum"
        )
        return (
            f"{self.rows:,} {split} rows: {argmax}, max |Δp| {self.max_difference:.1e} "
            f"(limit {AGREEMENT_TOLERANCE:.0e})"
        )


@dataclass(frozen=True)
class Exported:
    """What `export` wrote, for the summary."""

    path: Path
    size: int
    opset: int
    agreement: Agreement
    meta: dict[str, str]


def exported_graph(model: nn.Module) -> nn.Module:
    """The module torch.onnx exports: MNIST-form pixels and numbers in, both heads' probabilities
    and logits out (OUTPUT_NAMES), in eval mode."""
    import torch

    from mnistsum_cli.data.tensors import normalise

    class ExportedGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, ...]:
            digit_logits, sum_logits = self.model(normalise(images), numbers)
            return digit_logits.softmax(dim=1), sum_logits.softmax(dim=1), digit_logits, sum_logits

    return ExportedGraph().eval()


def onnx_graph(model: nn.Module, opset: Optional[int], metadata: dict[str, str]) -> onnx.ModelProto:
    """The ONNX model of `model` (weights inside) with `metadata` and its opset as metadata_props,
    checked by onnx.checker. The exporter's progress lines and warnings are kept from the
    terminal; its failures are one line."""
    import onnx
    import torch
    from torch.export import Dim

    examples = (torch.zeros(2, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    batch = Dim("batch", min=1)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                exported_graph(model),
                examples,
                dynamo=True,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch}, {0: batch}),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
    except Exception as error:  # torch.export and the exporter raise many types
        raise MnistsumError(f"torch.onnx cannot export this model ({first_line(error)})") from None
    proto = program.model_proto
    written = opset_of(proto)
    if opset is not None and written != opset:  # the exporter falls back rather than fail
        raise BadOption(f"--opset {opset}: the exporter cannot write it (it wrote opset {written}); choose another")
    graph = {"graph_sha256": graph_fingerprint(proto.SerializeToString())}
    for key, value in {**metadata, **graph, "opset": str(written)}.items():
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as error:
        raise MnistsumError(f"the exported graph fails onnx.checker ({first_line(error)})") from None
    return proto


def export_metadata(model_meta: dict[str, Any], model_sha256: str) -> dict[str, str]:
    """The metadata_props of the export of a model.safetensors with metadata `model_meta` and
    hash `model_sha256` (onnx_graph adds the opset and the graph's hash, export_model the check)."""
    return {
        "format": ONNX_FORMAT,
        "arch": model_meta["arch"],
        "run_id": model_meta["run_id"],
        "dataset_id": model_meta["dataset_id"],
        "model_sha256": model_sha256,
        "inputs": INPUTS_TEXT,
        "outputs": OUTPUTS_TEXT,
        "package_version": __version__,
        "created_at": now_iso(),
    }


def opset_of(proto: onnx.ModelProto) -> int:
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def agreement(
    digit_torch: np.ndarray, sum_torch: np.ndarray, digit_onnx: np.ndarray, sum_onnx: np.ndarray
) -> Agreement:
    import numpy as np

    difference = max(float(np.abs(digit_onnx - digit_torch).max()), float(np.abs(sum_onnx - sum_torch).max()))
    return Agreement(
        rows=len(digit_torch),
        digit_mismatches=int((digit_onnx.argmax(1) != digit_torch.argmax(1)).sum()),
        sum_mismatches=int((sum_onnx.argmax(1) != sum_torch.argmax(1)).sum()),
        max_difference=difference,
    )


def check_opset(opset: Optional[int]) -> None:
    """--opset within what the exporter writes and this onnx package knows."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise BadOption(f"--opset {opset}: onnx {onnx.__version__} knows opsets {MIN_OPSET}-{newest}")


def export_model(folder: RunDir, prepared: SplitData, out: Optional[Path], opset: Optional[int]) -> Exported:
    """Export the run's model.safetensors to `out` (default the run's model.onnx), after checking
    it on the test split of `prepared`."""
    import numpy as np
    import torch

    from mnistsum_cli.data.tensors import split_tensors
    from mnistsum_cli.training.checkpoint import load_model_bytes
    from mnistsum_cli.training.inference import predict

    require_extra("export")
    check_opset(opset)
    if out is not None and _same(out, folder.onnx):
        out = None  # the run's own model.onnx: written by a commit of its folder, as by default
    target = folder.onnx if out is None else out
    if out is not None and any(_same(out, path) for path in folder.run_files() if path != folder.onnx):
        raise BadOption(f"--out {out}: a file of the run itself; give another name (default {folder.onnx})")

    model_data = read_consistently(folder.root, lambda: read_file(folder.model, MODEL_META.max_bytes, "train"))
    torch_device = torch.device("cpu")
    model, model_meta = load_model_bytes(model_data, folder.model, torch_device)
    sha256 = fingerprint_bytes(model_data)
    dataset, mnist = prepared.dataset, prepared.mnist
    if dataset.meta["dataset_id"] != model_meta["dataset_id"]:
        raise MnistsumError(
            f"{folder.model} was trained on another dataset than {prepared.folder.root}/: export checks the model on "
            "the test split it was trained with (give its --data)"
        )
    test = split_tensors(dataset, mnist, "test", torch_device)
    expected = predict(model, test)
    proto = onnx_graph(model, opset, export_metadata(model_meta, sha256))
    onnx_model = OnnxModel(onnx_session(proto.SerializeToString(), target), {})
    images, numbers = test.images.numpy(), test.numbers.numpy()
    parts = [
        onnx_model.probabilities(images[start : start + EVAL_BATCH_SIZE], numbers[start : start + EVAL_BATCH_SIZE])
        for start in range(0, len(images), EVAL_BATCH_SIZE)
    ]
    found = agreement(
        expected.digit_probs.numpy(),
        expected.sum_probs.numpy(),
        np.concatenate([digit for digit, _ in parts]),
        np.concatenate([total for _, total in parts]),
    )
    if not found.passed:
        raise MnistsumError(f"onnxruntime disagrees with torch ({found.text('test')}): {target} not written")
    proto.metadata_props.add(key="check", value=found.text("test"))
    data = proto.SerializeToString()
    meta = current_onnx_model(data, sha256, folder).meta  # what predict and serve will check, checked now
    if out is None:
        with commit(folder.root, "export", "--artifacts") as change:
            if fingerprint_file(folder.model, MODEL_META) != sha256:  # under the lock: train cannot change it now
                raise MnistsumError(f"{folder.model} changed while it was exported: run `mnistsum export` again")
            change.write(folder.onnx, data)
    else:
        try:
            replace_file(out, data)
        except OSError as error:
            raise MnistsumError(f"cannot write {out}: {error.strerror or error}; nothing was changed") from None
    return Exported(target, len(data), opset_of(proto), found, meta)


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()
