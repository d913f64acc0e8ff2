"""bench/gpu_check.py before a GPU comes: the dry run (tiny sizes, CPU) goes through every step
the GPU run takes except the CUDA-only work -- packing and unpacking MNIST, the offline install,
the versions, `pytest -m cuda` (all skipped here), both benchmark runs, the profile, the reports --
so that the first GPU minute is not spent on a typo."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import make_fake_mnist

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "bench" / "gpu_check.py"
REPORTS = {"gpu_check.log", "figures.json", "summary.md", "pytest-cuda.xml"}


def gpu_check(*args: object, timeout: int = 900, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def bare_python(folder: Path) -> str:
    """A fresh `python -m venv` -- the pip and setuptools a bare Python comes with (here
    setuptools 65, which cannot build a wheel without the `wheel` package; Python 3.12's venv
    has no setuptools at all) -- that sees this environment's torch, pytest and the rest
    through a .pth line after its own site-packages, as the GPU machine's Python has them
    (never this environment's mnistsum: an editable install's .pth is not read from there)."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
    python = str(folder / "bin" / "python")
    bare_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(bare_site, "outer-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A synthetic MNIST big enough for prepare's 5000 validation rows, packed as the preparation
    step packs the real one (with the build backend's wheels), then `gpu_check.py --dry-run
    OUTDIR` under a bare Python."""
    root = tmp_path_factory.mktemp("gpu_check")
    mnist = make_fake_mnist(root / "mnist", n_train=5_400, n_test=300)
    packed = gpu_check("--pack", mnist.root, "--mnist-pack", root / "pack")
    assert packed.returncode == 0, packed.stderr
    gzipped = sorted(p.name for p in (root / "pack").glob("*.gz"))
    assert gzipped == sorted(f"{p.name}.gz" for p in mnist.raw_dir.iterdir())
    assert [p.name.split("-")[0] for p in (root / "pack" / "build").glob("*.whl")] == ["setuptools"]
    python = bare_python(root / "bare")
    return root / "out", gpu_check("--dry-run", "--mnist-pack", root / "pack", root / "out", python=python)


def test_dry_run_passes_every_step(dry_run) -> None:
    outdir, result = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((outdir / "figures.json").read_text())
    checks = {check["name"]: check for check in figures["checks"]}
    assert list(checks) == [
        "unpack MNIST",
        "install offline",
        "versions",
        "pytest -m cuda",
        "classic vs default",
        "presets",
        "profile",
    ]
    assert all(check["ok"] for check in checks.values()), checks
    assert "skipped" in checks["pytest -m cuda"]["detail"]
    assert (
        Path(figures["versions"]["mnistsum_from"]).parent.parent.name == "site"
    )  # the offline install, not the checkout
    assert "built with setuptools-" in checks["install offline"]["detail"]  # the carried backend, not the bare one


def test_dry_run_measures_what_the_gpu_run_reports(dry_run) -> None:
    outdir, _ = dry_run
    figures = json.loads((outdir / "figures.json").read_text())
    names = [run["name"] for report in figures["bench"].values() for run in report["runs"]]
    assert names == ["classic pipeline", "mnistsum default/fastnet", "mnistsum best/fastnet", "mnistsum cpu/lean"]
    assert figures["bench"]["classic vs default"]["target"] == {"digit": 0.995, "sum": 0.994}
    profile = figures["profile"]
    assert profile["steps"] == 2 and profile["per_step"] > 0 and profile["top"]
    summary = (outdir / "summary.md").read_text()
    assert "| presets | ok |" in summary and "mnistsum best/fastnet" in summary and "Profile of 2 steps" in summary


def test_reports_are_few_files_close_to_outdir(dry_run) -> None:
    outdir, _ = dry_run
    files = [p for p in outdir.rglob("*") if p.is_file()]
    assert {p.name for p in files} == REPORTS
    assert all(len(p.relative_to(outdir).parts) <= 2 for p in files)


def test_a_failed_step_still_writes_the_reports(tmp_path: Path) -> None:
    result = gpu_check("--dry-run", "--mnist-pack", tmp_path / "not-packed", tmp_path / "out", timeout=120)
    assert result.returncode == 1
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert [(c["name"], c["ok"]) for c in figures["checks"]] == [("unpack MNIST", False)]
    assert "--pack" in figures["checks"][0]["detail"]
    assert "**FAILED**" in (tmp_path / "out" / "summary.md").read_text()
