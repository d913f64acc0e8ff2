"""bench/serve_load.py on a tiny count: it starts `serve`, loads it, stops by itself and reports
sane figures (the real measurement is a bench run, not a test)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from mnistsum_cli.store.paths import RunDir

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[dev]'")
from test_serve import write_model

pytestmark = pytest.mark.same_on_every_torch  # .ci/run leaves it out on the oldest torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"


def test_serve_load_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_load", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    run = RunDir(tmp_path / "artifacts")
    write_model(run, "bench1", seed=0)
    results = bench.run_bench(run.root, workers=[1, 2], clients=[1, 3], requests=20, max_seconds=120, predict_runs=1)
    assert [(row["workers"], row["clients"]) for row in results["serve"]] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for row in results["serve"]:
        assert row["requests"] == 20 and row["errors"] == 0, row
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], row
        assert row["requests_per_s"] > 0 and 0 < row["pss_start_mib"] <= row["pss_max_mib"], row
    assert results["serve_exit_codes"] == [0, 0]
    assert len(results["predict_process_s"]) == 1 and results["predict_process_s"][0] > 0
