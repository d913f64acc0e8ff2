"""The run card: what GET /api/model says about the model serving, and which of the run's plots
the app may serve. It reads the run's evaluations and plot manifest, tolerantly: a file that
cannot be read leaves its part of the card out, and the page shows what it can."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mnistsum_cli.errors import MnistsumError
from mnistsum_cli.serve.follower import ServedModel
from mnistsum_cli.store.diskfiles import read_json
from mnistsum_cli.store.paths import SPLITS, RunDir
from mnistsum_cli.store.schemas import EVALUATION, PLOTS_MANIFEST
from mnistsum_cli.store.validation import Schema
from mnistsum_cli.training.run import evaluates

CARD_METRICS = ("rows", "digit_accuracy", "sum_accuracy", "consistency")  # of each evaluation, on the card


def run_card(folder: RunDir, served: ServedModel, problem: Optional[str]) -> dict[str, Any]:
    """What GET /api/model says: the run, its evaluations and plots when they were made from
    this very model, and why a newer model is not serving, if so."""
    meta = served.meta
    return {
        "run_id": served.run_id,
        "arch": meta.get("arch"),
        "epoch": meta.get("epoch"),
        "dataset_id": meta.get("dataset_id"),
        "sha256": served.sha256,
        "runtime": served.runtime,
        "loaded_at": served.loaded_at,
        "training_val": {
            "digit_accuracy": meta.get("val_digit_accuracy"),
            "sum_accuracy": meta.get("val_sum_accuracy"),
        },
        "evaluations": {
            split: {key: metrics.get(key) for key in CARD_METRICS}
            for split, metrics in evaluations_of(folder, served).items()
        },
        "plots": [f"/plots/{name}" for name in listed_plots(folder, served)],
        "problem": problem,
    }


def evaluations_of(folder: RunDir, served: ServedModel) -> dict[str, dict[str, Any]]:
    """The evaluation of each split that belongs to the model serving, by the one rule every
    reader of a run shares (training.run.evaluates)."""
    evaluations = {}
    for split in SPLITS:
        metrics = _json_or_none(folder.evaluation(split), EVALUATION)
        if evaluates(metrics, served.sha256):
            evaluations[split] = metrics
    return evaluations


def listed_plots(folder: RunDir, served: ServedModel) -> list[str]:
    """The plot file names plots/manifest.json lists, when it was drawn for this model (by
    fingerprint); the only files of the run the app serves."""
    manifest = _json_or_none(folder.plots_manifest, PLOTS_MANIFEST)
    if not isinstance(manifest, dict) or (manifest.get("inputs") or {}).get("model") != served.sha256:
        return []
    files = manifest.get("files")
    return [
        name
        for name in (files if isinstance(files, list) else [])
        if isinstance(name, str)
        and name.endswith(".png")
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
    ]


def _json_or_none(path: Path, kind: Schema) -> Any:
    """The JSON in `path`, read as a checked file of `kind` (store.read_json), or None when it
    cannot be read: the page shows what it can."""
    try:
        return read_json(path, kind.stage, kind.max_bytes)
    except MnistsumError:
        return None
