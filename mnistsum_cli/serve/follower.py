"""The model that follows the run folder: `serve` answers with the run's current model, read as
one consistent version and swapped in when its files change, without a restart.

Checking and swapping happen on the event loop alone (a new model is read in a thread, then
swapped in on the loop), and each request keeps the ServedModel it started with, so no lock is
needed. With `--runtime onnx` the model is the run's model.onnx on onnxruntime
(evaluation/onnx_runtime.py) and torch is never imported."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from starlette.concurrency import run_in_threadpool

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.store.diskfiles import read_with_status
from mnistsum_cli.store.fingerprints import fingerprint_bytes, now_iso
from mnistsum_cli.store.paths import RunDir
from mnistsum_cli.store.reads import read_consistently
from mnistsum_cli.store.schemas import MODEL_META, ONNX_META
from mnistsum_cli.training.run import model_meta

if TYPE_CHECKING:  # torch loads only for --runtime torch
    import torch

FileIdentity = tuple[int, int, int]  # (inode, size, mtime_ns): a file changed when this did


@dataclass(frozen=True)
class ServedModel:
    model: Any  # an nn.Module on torch's device (runtime torch) or an onnx_runtime.OnnxModel
    meta: dict[str, Any]  # model.safetensors' metadata
    identity: tuple[FileIdentity, ...]  # of each file read (served_files)
    sha256: str  # as fingerprints.fingerprint_file: what evaluations and the plot manifest record
    loaded_at: str
    runtime: str = "torch"

    @property
    def run_id(self) -> Optional[str]:
        """The training run the model comes from, as its metadata says (what every answer names)."""
        return self.meta.get("run_id")


def file_identity(stat: os.stat_result) -> FileIdentity:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def served_files(folder: RunDir, runtime: str) -> tuple[os.PathLike, ...]:
    """The files a model is read from: model.safetensors, and model.onnx on the onnx runtime."""
    return (folder.model, folder.onnx) if runtime == "onnx" else (folder.model,)


def read_served_model(folder: RunDir, device: Optional[torch.device], runtime: str = "torch") -> ServedModel:
    """Read the run's model as one consistent version: every read of a run by `serve` goes
    through here. It reads as every reader of a run folder does (store.read_consistently: never
    during an unfinished commit); one checked open of each file (a regular file within its
    kind's size cap: diskfiles.read_with_status) + one read sees a whole file, and its identity
    comes from that same open file. On the onnx runtime, model.onnx answers, and only when it is
    the export of that model.safetensors (whose header gives the metadata, read without torch)."""
    files = list(zip(served_files(folder, runtime), ((MODEL_META.max_bytes, "train"), (ONNX_META.max_bytes, "export"))))

    def read() -> tuple[tuple[FileIdentity, ...], list[bytes]]:
        identities, contents = [], []
        for path, (max_bytes, stage) in files:
            status, data = read_with_status(path, max_bytes, stage)
            identities.append(file_identity(status))
            contents.append(data)
        return tuple(identities), contents

    identity, contents = read_consistently(folder.root, read)
    data, sha256 = contents[0], fingerprint_bytes(contents[0])
    if runtime == "onnx":
        from mnistsum_cli.evaluation.onnx_runtime import current_onnx_model

        meta = model_meta(folder, data)  # without torch
        model = current_onnx_model(contents[1], sha256, folder, threads=1)
    else:
        from mnistsum_cli.training.checkpoint import load_model_bytes

        model, meta = load_model_bytes(data, folder.model, device)
    return ServedModel(model, meta, identity, sha256, now_iso(), runtime)


class ModelFollower:
    """The model that answers: the run's current model (served_files), checked by a stat on each
    request. A new file is loaded once, in a thread: the read waits while a commit of the folder
    is unfinished (store.read_consistently), and meanwhile the event loop answers the other
    requests (/healthz at once). A file that cannot be loaded leaves the previous model serving,
    with the reason in `problem` (until the file changes again)."""

    def __init__(self, folder: RunDir, device: Optional[torch.device], runtime: str = "torch") -> None:
        self.folder, self.device, self.runtime = folder, device, runtime
        self.current = read_served_model(folder, device, runtime)
        self.seen: Optional[tuple[FileIdentity, ...]] = self.current.identity
        self.problem: Optional[str] = None
        self.loading: Optional[asyncio.Task] = None

    def refresh(self) -> Optional[asyncio.Task]:
        """Start loading the files if they changed since they were last looked at; the load under
        way, if any (one at a time)."""
        if self.loading is None:
            try:
                identity = tuple(file_identity(os.stat(path)) for path in served_files(self.folder, self.runtime))
            except OSError:
                identity = None
            if identity != self.seen:
                self.seen = identity
                self.loading = asyncio.get_running_loop().create_task(self._load())
        return self.loading

    async def get(self) -> ServedModel:
        """The current model, after the load that a change of the files started, if any."""
        loading = self.refresh()
        if loading is not None:
            await asyncio.shield(loading)  # a client that leaves does not cancel the load others wait for
        return self.current

    async def _load(self) -> None:
        try:
            served = await run_in_threadpool(read_served_model, self.folder, self.device, self.runtime)
        except Exception as error:  # whatever it is, the previous model serves on and `problem` says why
            reason = (
                str(error) if isinstance(error, MnistsumError) else f"{self.folder.model}: cannot load it ({error!r})"
            )
            self.problem = f"{reason}; still serving run {self.current.run_id}"
        else:
            self.current, self.seen, self.problem = served, served.identity, None
        finally:
            self.loading = None
