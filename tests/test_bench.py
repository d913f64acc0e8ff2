"""bench/bench.py end to end on the CPU with tiny sizes: a smoke test that the benchmark still
runs against the package (its numbers are measured by running it, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_MNIST_ENV

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

REPOSITORY = Path(__file__).resolve().parents[1]


def test_bench_runs_classic_pipeline_and_presets(shared_mnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(REPOSITORY / "bench" / "bench.py"),
        "--cpu",
        "--mnist-dir",
        str(shared_mnist),
        "--limit",
        "300",
        "--baseline-epochs",
        "1",
        "--num-workers",
        "0",
        "--preset",
        "cpu",
        "--preset",
        "lenet",
        "--epochs",
        "1",
        "--target",
        "0.2",
        "--sum-target",
        "0.1",
        "--json-out",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k != TEST_MNIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), env.get("PYTHONPATH", "")])
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dataset"]["rows"] == {"train": 300, "val": 300, "test": 300}
    assert report["target"] == {"digit": 0.2, "sum": 0.1}
    runs = {run["name"]: run for run in report["runs"]}
    assert list(runs) == ["classic pipeline", "mnistsum cpu/lean", "mnistsum lenet/lenet"]
    for run in runs.values():
        assert len(run["epochs"]) == 1 and run["train_seconds"] > 0
        assert 0 < run["images_per_second"] and 0 <= run["final_digit_accuracy"] <= 1
    assert runs["classic pipeline"]["images_per_second"] == 300 / runs["classic pipeline"]["train_seconds"]
    assert "speedup" not in runs["classic pipeline"] and "speedup_vs_first" in runs["mnistsum lenet/lenet"]
    assert "time to 20.0% digit and 10.0% sum test accuracy" in " ".join(result.stdout.split())


def test_sweep_bench_runs(fake_mnist, tmp_path: Path) -> None:
    """bench/sweep_bench.py with one one-epoch trial a part: every part reports its figures (on
    such trials Optuna's share is large: the benchmark's own sizes measure it)."""
    out = tmp_path / "sweep.json"
    command = [sys.executable, str(REPOSITORY / "bench" / "sweep_bench.py"), "--mnist-dir", str(fake_mnist.root)]
    command += ["--limit", "400", "--val-size", "80", "--trials", "1", "--epochs", "1", "--json-out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {(run["storage"], run["pruner"]): run for run in report["in_process"]}
    assert {("sqlite", "none"), ("sqlite", "median")} <= set(runs)
    for run in runs.values():
        assert run["trials"] == run["finished"] == 1 and run["epochs_run"] == 1
        assert run["overhead_share"] > 0 and 0 <= run["best_val_sum_accuracy"] <= 1
    assert [run["jobs"] for run in report["jobs"]] == [1, 2] and all(r["wall_seconds"] > 0 for r in report["jobs"])
    assert "speed-up" in result.stdout and "load:" in result.stdout
