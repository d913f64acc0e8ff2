"""What the store costs, measured side by side in one run (see docs/reliability.md):

1. the epoch commit (Run.write_epoch: staged files, journal, renames, fsyncs) against the per-file
   atomic writes it replaced (each file: temporary file, fsync, rename; no journal, no lock),
   each timed on the same model, beside the epoch it ends (the `cpu` preset on `prepare
   --limit 2000`, as the reliability report measured it);
2. `mnistsum status` of the code before the store (a git revision, checked out into a
   temporary folder) and of this tree, alternated on the same folders.

    python bench/commit.py --mnist-dir /work/shared/mnist [--before 5cf9575] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def mnistsum(tree: Path, *args: object) -> float:
    """Run the CLI of the code in `tree`; returns the wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mnistsum_cli", *map(str, args)], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def per_file_writes(trained, learner, improved: bool) -> None:
    """The writes an epoch made before the store: five files, each atomic on its own."""
    from safetensors.torch import save_file

    from mnistsum_cli.training.checkpoint import WEIGHTS_PREFIX, optimizer_tensors
    from mnistsum_cli.training.run import COMMON_KEYS

    setup, state, run = trained.setup, trained, trained.folder  # a Run, in the old code's names

    def atomic(path: Path, write) -> None:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        write(name)
        with open(name, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(name, path)

    common = {key: setup[key] for key in COMMON_KEYS}
    encode = lambda meta: {key: json.dumps(value) for key, value in meta.items()}  # noqa: E731
    if improved:
        tensors = {n: t.detach().contiguous() for n, t in learner.model.state_dict().items()}
        atomic(
            run.model, lambda tmp: save_file(tensors, tmp, metadata=encode({"format": "mnistsum-model/1", **common}))
        )
    optim, groups = optimizer_tensors(learner.optimizer)
    weights = {f"{WEIGHTS_PREFIX}{n}": t.detach().contiguous() for n, t in learner.model.state_dict().items()}
    meta = {"format": "mnistsum-checkpoint/1", **common, "epoch": state.epoch, "param_groups": groups}
    atomic(run.checkpoint, lambda tmp: save_file({**weights, **optim}, tmp, metadata=encode(meta)))
    for path, data in (
        (run.history, {**common, "epochs": state.history}),
        (run.train_state, {**common, "epoch": state.epoch}),
        (run.setup_file, setup),
    ):
        atomic(path, lambda tmp, data=data: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def time_commits(artifacts: Path, repeat: int) -> dict[str, list[float]]:
    """Run.write_epoch and the per-file writes, alternated, on the run `train` left in `artifacts`."""
    from dataclasses import replace

    import torch

    from mnistsum_cli.settings import TrainConfig
    from mnistsum_cli.store.paths import RunDir
    from mnistsum_cli.training.checkpoint import Learner
    from mnistsum_cli.training.loop import make_optimizer
    from mnistsum_cli.training.models import build_model
    from mnistsum_cli.training.run import Run

    folder = RunDir(artifacts)
    state_file = json.loads(folder.train_state.read_text())
    config = TrainConfig.from_dict(state_file["config"])
    model = build_model(config.arch)
    learner = Learner(model, make_optimizer(model, config), torch.amp.GradScaler("cpu", enabled=False))
    setup = json.loads(folder.setup_file.read_text())
    facts = {key: value for key, value in setup.items() if key not in ("run_id", "dataset_id", "config")}
    run = Run.resume(folder, learner, config, state_file["dataset_id"], facts)
    targets = {"store": RunDir(artifacts.parent / "store"), "before": RunDir(artifacts.parent / "before")}
    for target in targets.values():
        target.root.mkdir()
    times: dict[str, list[float]] = {"store": [], "before": []}
    writes = {
        "store": lambda target: replace(run, folder=target).write_epoch(learner, True),
        "before": lambda target: per_file_writes(replace(run, folder=target), learner, True),
    }
    for _ in range(repeat):
        for name, write in writes.items():
            started = time.perf_counter()
            write(targets[name])
            times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-dir", type=Path, required=True)
    parser.add_argument("--before", default="5cf9575", help="git revision of the code before the store")
    parser.add_argument("--repeat", type=int, default=20)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        before_tree = root / "before-tree"
        before_tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", options.before], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(before_tree)], input=archive, check=True)
        data, artifacts = root / "data", root / "artifacts"
        mnistsum(REPO, "prepare", "--mnist-dir", options.mnist_dir, "--limit", 2000, "--data", data)
        mnistsum(REPO, "train", "--preset", "cpu", "--cpu", "--data", data, "--artifacts", artifacts)
        epoch_seconds = statistics.median(
            r["seconds"] for r in json.loads((artifacts / "history.json").read_text())["epochs"]
        )

        commits = time_commits(artifacts, options.repeat)
        status = {"before": [], "store": []}
        for _ in range(5):
            for name, tree in (("before", before_tree), ("store", REPO)):
                status[name].append(mnistsum(tree, "status", "--data", data, "--artifacts", artifacts))

    print(f"machine: {os.cpu_count()} CPUs; epoch of the cpu preset on 2000 rows: {epoch_seconds:.2f} s (median)")
    print(f"{'':32}{'before':>12}{'store':>12}")
    for label, key in (("epoch writes, median (ms)", commits), ("epoch writes, max (ms)", commits)):
        pick = statistics.median if "median" in label else max
        print(f"{label:32}{1000 * pick(key['before']):12.1f}{1000 * pick(key['store']):12.1f}")
    for name in ("before", "store"):
        share = 100 * statistics.median(commits[name]) / epoch_seconds
        print(f"  {name}: {share:.2f} % of the epoch")
    print(
        f"{'status, median of 5 (s)':32}{statistics.median(status['before']):12.2f}{statistics.median(status['store']):12.2f}"
    )


if __name__ == "__main__":
    main()
