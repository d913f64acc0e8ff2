"""What `mnistsum sweep` costs and saves, side by side in one run (docs/performance.md):

1. Optuna's added cost per trial (storage, sampling, heartbeats, and the trial record) as a share
   of the trial's own time (run_training), with SQLite and with PostgreSQL (a server of its own,
   tests/pgserver.py; left out where PostgreSQL is not installed): one in-process worker each;
2. the epochs pruning saves: the median pruner against none, same sampler seed, with the best
   val sum accuracy each found;
3. the wall time of `mnistsum sweep --jobs 2` against `--jobs 1` (each a whole CLI run: one
   job keeps torch's threads, two get one thread each).

Every sweep searches the default space of the `cpu` preset (mnistsum_cli/sweep/space.py) on a
`prepare --limit` subset of MNIST. The machine's load (`uptime`) is recorded before each part.

    python bench/sweep_bench.py --mnist-dir /work/shared/mnist [--limit 3000] [--trials 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # pgserver.py


def mnistsum(*args: object) -> float:
    """Run the CLI of this tree; returns its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mnistsum_cli", *map(str, args)], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def plan_for(storage: str, study: str, args: argparse.Namespace, pruner: str, data: Path) -> Any:
    """The plan `mnistsum sweep --cpu --seed 0` makes, with the epochs fixed when --epochs."""
    from dataclasses import replace

    from mnistsum_cli.sweep.plan import make_plan

    plan = make_plan(
        study=study,
        trials=args.trials,
        storage=storage,
        space=None,
        preset_name=None,
        objective="accuracy",
        pruner=pruner,
        timeout=None,
        seed=0,
        heartbeat=10,
        data=data,
        artifacts=args.work / "artifacts",
        mnist_dir=None,
        device_type=lambda: "cpu",
    )
    if args.epochs is None:
        return plan
    return replace(plan, space=replace(plan.space, fixed={**plan.space.fixed, "epochs": args.epochs}))


def in_process_sweep(storage: str, study: str, args: argparse.Namespace, data: Path, pruner: str) -> dict[str, Any]:
    """One worker in this process; its time split into run_training and the rest."""
    from mnistsum_cli.data.splitdata import SplitData
    from mnistsum_cli.store.paths import DataDir
    from mnistsum_cli.sweep.plan import open_study
    from mnistsum_cli.sweep.storage import load_study
    from mnistsum_cli.sweep.summary import finished_count, trial_counts
    from mnistsum_cli.sweep.worker import Worker

    plan = plan_for(storage, study, args, pruner, data)
    open_study(plan, SplitData(DataDir(data)).header.dataset_id)
    load = uptime()
    stats = Worker(plan, "cpu", say=lambda line: print("   ", line, flush=True)).run()
    study_now = load_study(storage, study)
    trials = study_now.get_trials(deepcopy=False)
    overhead = stats.loop_seconds - stats.training_seconds
    return {
        "study": study,
        "storage": storage.split(":")[0].split("+")[0],
        "pruner": pruner,
        "uptime": load,
        "trials": stats.trials,
        "finished": finished_count(trial_counts(study_now)),
        "pruned": sum(t.state.name == "PRUNED" for t in trials),
        "epochs_run": sum(t.user_attrs.get("epochs_done", 0) for t in trials),
        "best_val_sum_accuracy": study_now.best_value,
        "loop_seconds": stats.loop_seconds,
        "training_seconds": stats.training_seconds,
        "overhead_seconds_per_trial": overhead / stats.trials,
        "overhead_share": overhead / stats.training_seconds,
    }


def cli_sweep(jobs: int, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """A whole `mnistsum sweep --jobs J` run, timed from outside."""
    study = f"jobs-{jobs}"
    space = args.work / "space.toml"
    load = uptime()
    seconds = mnistsum(
        "sweep", "--cpu", "--study", study, "--trials", args.trials, "--jobs", jobs, "--pruner", "none",
        "--seed", 0, "--data", data, "--artifacts", args.work / "artifacts", *(["--space", space] if space.exists() else []),
    )  # fmt: skip
    return {"jobs": jobs, "uptime": load, "trials": args.trials, "wall_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-dir", type=Path, default=REPO.parent / "shared" / "mnist")
    parser.add_argument("--limit", type=int, default=3000, help="prepare --limit: rows per split")
    parser.add_argument("--val-size", type=int, default=500, help="prepare --val-size")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=None, help="fix the epochs (default: the cpu preset's)")
    parser.add_argument("--json-out", type=Path, default=REPO / "bench" / "results" / "sweep.json")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the in-process worker (1: a shared machine)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from mnistsum_cli.sweep.space import DEFAULT_SPACES
    from pgserver import postgres_binaries, postgres_server

    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as work:
        args.work = Path(work)
        data = args.work / "data"
        mnistsum(
            "prepare", "--mnist-dir", args.mnist_dir, "--limit", args.limit, "--val-size", args.val_size, "--data", data
        )
        if args.epochs is not None:  # the cpu space with the epochs fixed, for the CLI runs too
            lines = [f"epochs = {args.epochs}"] + [
                f"[{name}]\n" + "\n".join(f"{key} = {json.dumps(value)}" for key, value in entry.items())
                for name, entry in DEFAULT_SPACES["cpu"].items()
            ]
            (args.work / "space.toml").write_text("\n".join(lines) + "\n")
        report: dict[str, Any] = {"machine": os.uname().nodename, "cores": os.cpu_count(), "args": {
            "limit": args.limit, "val_size": args.val_size, "trials": args.trials, "epochs": args.epochs}}  # fmt: skip
        sqlite = lambda name: f"sqlite:///{args.work / (name + '.db')}"  # noqa: E731
        print("overhead, SQLite (pruner none):", flush=True)
        runs = [in_process_sweep(sqlite("none"), "none", args, data, "none")]
        binaries = postgres_binaries()
        if binaries is not None:
            print("overhead, PostgreSQL (pruner none):", flush=True)
            with postgres_server(binaries) as url:
                runs.append(in_process_sweep(url, "postgres", args, data, "none"))
        print("pruning, SQLite (median pruner):", flush=True)
        runs.append(in_process_sweep(sqlite("median"), "median", args, data, "median"))
        report["in_process"] = runs
        print("--jobs 1 and --jobs 2 (whole CLI runs):", flush=True)
        report["jobs"] = [cli_sweep(jobs, args, data) for jobs in (1, 2)]

    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{'run':28} {'trials':>6} {'pruned':>6} {'epochs':>6} {'best val sum':>12} {'train s':>8} {'Optuna s/trial':>14} {'share':>7}"
    )
    for run in report["in_process"]:
        print(
            f"{run['storage'] + ', pruner ' + run['pruner']:28} {run['trials']:6} {run['pruned']:6} {run['epochs_run']:6} "
            f"{100 * run['best_val_sum_accuracy']:11.2f}% {run['training_seconds']:8.1f} "
            f"{run['overhead_seconds_per_trial']:14.3f} {100 * run['overhead_share']:6.2f}%"
        )
        print(f"    load: {run['uptime']}")
    one, two = report["jobs"]
    print(f"\n--jobs 1: {one['wall_seconds']:.1f} s   --jobs 2: {two['wall_seconds']:.1f} s   "
          f"speed-up {one['wall_seconds'] / two['wall_seconds']:.2f}x  ({args.trials} trials each)")  # fmt: skip
    for run in report["jobs"]:
        print(f"    load before --jobs {run['jobs']}: {run['uptime']}")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
