"""torch against onnxruntime, side by side in one run, on a run exported by `mnistsum export`:

- `mnistsum predict one.png` as a process (`--runtime torch` / `--runtime onnx`, alternating);
- `mnistsum serve` under load (bench/serve_load.py: requests/s, p50/p99, PSS), one server per runtime;
- evaluate-style throughput: every row of the test split in batches of 2048, in this process.

    python bench/export_bench.py --artifacts artifacts --data data --json export-bench.json

The figures depend on what else runs on the machine: the load average before and after is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import serve_load  # noqa: E402 (beside this file)

RUNTIMES = ("torch", "onnx")


def predict_processes(artifacts: Path, image: Path, runs: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU (user + system) seconds of `mnistsum predict IMAGE` as a process on each
    runtime, alternating so that a change in the machine's load falls on both; the CPU seconds
    depend far less on what else runs than the wall time does."""
    times: dict[str, dict[str, list[float]]] = {runtime: {"wall_s": [], "cpu_s": []} for runtime in RUNTIMES}
    for _ in range(runs):
        for runtime in RUNTIMES:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            times[runtime]["wall_s"] += serve_load.predict_process_seconds(artifacts, image, 1, runtime)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            times[runtime]["cpu_s"].append(round(cpu, 3))
    return times


def split_throughput(artifacts: Path, data: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Rows per second over the whole test split, as `evaluate` runs a model (torch: inference.predict
    with its batches and losses; onnx: the same batches through onnxruntime), best of `repeats`."""
    import torch

    from mnistsum_cli.data.splitdata import SplitData
    from mnistsum_cli.data.tensors import split_tensors
    from mnistsum_cli.evaluation.onnx_runtime import load_onnx_model
    from mnistsum_cli.store.paths import DataDir, RunDir
    from mnistsum_cli.training.checkpoint import load_model
    from mnistsum_cli.training.inference import EVAL_BATCH_SIZE, predict

    run, prepared, cpu = RunDir(artifacts), SplitData(DataDir(data)), torch.device("cpu")
    test = split_tensors(prepared.dataset, prepared.mnist, "test", cpu)
    model, _ = load_model(run.model, cpu)
    onnx_model = load_onnx_model(run)
    images, numbers = test.images.numpy(), test.numbers.numpy()

    def on_onnx() -> None:
        for start in range(0, len(images), EVAL_BATCH_SIZE):
            onnx_model.probabilities(images[start : start + EVAL_BATCH_SIZE], numbers[start : start + EVAL_BATCH_SIZE])

    timed = {"torch": lambda: predict(model, test), "onnx": on_onnx}
    seconds: dict[str, list[float]] = {runtime: [] for runtime in RUNTIMES}
    for _ in range(repeats):
        for runtime in RUNTIMES:
            start = time.perf_counter()
            timed[runtime]()
            seconds[runtime].append(time.perf_counter() - start)
    threads = {"torch": str(torch.get_num_threads()), "onnx": "onnxruntime's default (one per core)"}
    return {
        runtime: {
            "rows": len(images),
            "best_s": round(min(s), 4),
            "rows_per_s": round(len(images) / min(s)),
            "threads": threads[runtime],
        }
        for runtime, s in seconds.items()
    }


def run_all(
    artifacts: Path,
    data: Path,
    workers: list[int],
    clients: list[int],
    requests: int,
    max_seconds: float,
    predict_runs: int,
    repeats: int,
) -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "one.png"
        image.write_bytes(serve_load.drawing_png())
        predicts = predict_processes(artifacts, image, predict_runs)
    serve = {
        runtime: serve_load.run_bench(artifacts, workers, clients, requests, max_seconds, 0, runtime=runtime)
        for runtime in RUNTIMES
    }
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "predict_process": predicts,
        "serve": [row for runtime in RUNTIMES for row in serve[runtime]["serve"]],
        "serve_exit_codes": {runtime: serve[runtime]["serve_exit_codes"] for runtime in RUNTIMES},
        "throughput": split_throughput(artifacts, data, repeats),
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--artifacts", type=Path, default=Path("artifacts"), help="an exported run (default: artifacts)"
    )
    parser.add_argument("--data", type=Path, default=Path("data"), help="its data folder, for the test split")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="serve --workers (default: 2)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8], help="concurrent clients (default: 8)")
    parser.add_argument("--requests", type=int, default=5000, help="requests per serve run (default: 5000)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop a serve run after this long")
    parser.add_argument("--predict-runs", type=int, default=5, help="`predict` processes per runtime (default: 5)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the test split per runtime (default: 3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.artifacts / "model.onnx").is_file():
        raise SystemExit(f"error: {args.artifacts}/model.onnx not found: run `mnistsum export` first")
    if min(args.workers + args.clients) < 1 or min(args.requests, args.predict_runs, args.repeats) < 1:
        raise SystemExit("error: --workers, --clients, --requests, --predict-runs and --repeats must be 1 or more")
    results = run_all(
        args.artifacts,
        args.data,
        args.workers,
        args.clients,
        args.requests,
        args.max_seconds,
        args.predict_runs,
        args.repeats,
    )
    loads = " / ".join(
        ", ".join(f"{x:.2f}" for x in results[key]) for key in ("load_average_before", "load_average_after")
    )
    print(f"machine: {results['machine']}; load average (1, 5, 15 min) before / after: {loads}")
    for runtime, times in results["predict_process"].items():
        print(
            f"predict one.png as a process, {runtime:>5}: median {statistics.median(times['wall_s']):.3f} s wall "
            f"(min {min(times['wall_s']):.3f}), {statistics.median(times['cpu_s']):.3f} s CPU, "
            f"{len(times['wall_s'])} runs"
        )
    print(
        f"{'runtime':>7} {'workers':>7} {'clients':>7} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} PSS MiB"
    )
    for row in results["serve"]:
        print(
            f"{row['runtime']:>7} {row['workers']:>7} {row['clients']:>7} {row['errors']:>6} "
            f"{row['requests_per_s']:>7} {row['p50_ms']:>7} {row['p99_ms']:>7} {row['pss_max_mib']}"
        )
    for runtime in RUNTIMES:
        figures = results["throughput"][runtime]
        print(f"test split ({figures['rows']:,} rows), {runtime:>5}: {figures['rows_per_s']:,} rows/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
