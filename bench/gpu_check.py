"""One command for a GPU machine: check what a simulated device cannot, and measure the GPU figures.

    python bench/gpu_check.py --pack ../shared/mnist   # once, where MNIST is: gzip it into mnist-local/
    python bench/gpu_check.py OUTDIR                    # on the GPU machine (no network needed)
    python bench/gpu_check.py --dry-run OUTDIR          # the same steps, tiny and on the CPU (CI runs it)

On the GPU machine only the repository travels (with its git-ignored mnist-local/). The script
unpacks MNIST there, installs the package offline into a throwaway folder (a wheel built from the
checkout with the build backend the preparation step carried in mnist-local/build/, installed
with --target: the machine's Python is not touched, and a bare one without setuptools will do),
prints the GPU, driver, CUDA and torch versions, runs `pytest -m cuda`, benchmarks the classic
pipeline (the conv/BatchNorm classifier design, DataLoader-fed) against the default preset to
99.5 % digit / 99.4 % sum test accuracy in one run, times every other preset (the `best` one
with its test accuracy), and profiles a few steps of the default preset. Everything goes into
OUTDIR: gpu_check.log, figures.json, summary.md, pytest-cuda.xml. The exit code is non-zero
when any check failed; the files are written either way.

Time budget (seconds, one H100/H200; each step stops at its share and at the hard limit):
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
MNIST_PACK = REPO / "mnist-local"  # git-ignored: carried with the repository, never committed
BUILD_WHEELS = "build"  # under the pack: the build backend's wheels, for the offline install
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
HARD_LIMIT = 480  # 8 minutes
BUDGET = {  # seconds per step; they add up to HARD_LIMIT
    "setup": 35,  # unpack MNIST, build and install the package, versions
    "pytest -m cuda": 170,  # the CUDA tests (torch.compile and real MNIST are most of it)
    "classic vs default": 130,  # the classic pipeline capped at 8 epochs, then the default preset
    "presets": 90,  # best first (its test accuracy), then the others, until the share is spent
    "profile": 40,  # 5 + 5 steps of the default preset under torch.profiler
    "reports": 15,
}
__doc__ += "".join(f"    {step:<20} {seconds:>4}\n" for step, seconds in BUDGET.items())
OTHER_PRESETS = ("best", "cpu", "lenet", "convnet", "cpu-v1")  # `default` runs beside the classic pipeline
TARGET = ("0.995", "0.994")  # test digit, sum accuracy


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the real check, or the dry run's tiny CPU version."""

    device: tuple[str, ...]
    bench: tuple[str, ...]  # extra bench.py arguments
    classic_epochs: int
    presets: tuple[str, ...]
    profile: tuple[str, ...]
    slack: float  # the time shares are multiplied by this


REAL = Sizes(device=("--gpu", "0"), bench=(), classic_epochs=8, presets=OTHER_PRESETS, profile=(), slack=1)
# a CPU shared with other work is slow: the dry run proves the steps, not the time they take
DRY = Sizes(
    device=("--cpu",),
    bench=("--limit", "300", "--epochs", "1", "--num-workers", "0"),
    classic_epochs=1,
    presets=OTHER_PRESETS[:2],
    profile=("--limit", "300", "--batch-size", "32", "--warmup", "2", "--steps", "2"),
    slack=4,
)


@dataclass
class Check:
    name: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class Session:
    """What has been found so far; written to OUTDIR whatever happens."""

    outdir: Path
    dry_run: bool
    slack: float
    deadline: float
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.outdir / "gpu_check.log"

    def say(self, text: str) -> None:
        print(text, flush=True)
        with self.log.open("a") as log:
            log.write(text + "\n")

    def record(self, name: str, ok: bool, started: float, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, round(time.monotonic() - started, 1), detail))
        self.say(
            f"{'ok  ' if ok else 'FAIL'} {name} ({time.monotonic() - started:.0f} s){': ' + detail if detail else ''}"
        )
        return ok

    def time_left(self, share: float) -> float:
        return max(1.0, min(share * self.slack, self.deadline - BUDGET["reports"] - time.monotonic()))

    def run(
        self, name: str, command: list[str], share: float, env: Optional[dict[str, str]] = None, cwd: Path = REPO
    ) -> Optional[subprocess.CompletedProcess]:
        """Run a step's command with its time share, its output appended to the log; None on timeout."""
        timeout = self.time_left(share)
        shown = " ".join("<script>" if "\n" in part else part for part in command)
        self.say(f"\n=== {name}: {shown} (limit {timeout:.0f} s)")
        try:
            result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            self._append(expired.stdout, expired.stderr)
            return None
        self._append(result.stdout, result.stderr)
        return result

    def run_script(
        self, name: str, script: str, args: list[str], share: float, env: dict[str, str]
    ) -> tuple[Optional[subprocess.CompletedProcess], Optional[dict[str, Any]]]:
        """Run bench/SCRIPT ARGS --json-out FILE as a step: its result (None on timeout) and the
        JSON it wrote, complete or as far as it got (None if it wrote none)."""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.json"
            command = [sys.executable, str(REPO / "bench" / script), *args, "--json-out", str(out)]
            result = self.run(name, command, share, env)
            return result, json.loads(out.read_text()) if out.exists() else None

    def _append(self, stdout: Any, stderr: Any) -> None:
        with self.log.open("a") as log:
            for text in (stdout, stderr):
                log.write(text.decode(errors="replace") if isinstance(text, bytes) else (text or ""))


# --------------------------------------------------------------------------- preparation and setup


def build_requirements() -> list[str]:
    """pyproject.toml's [build-system] requires: what building a wheel of the checkout needs
    (read with a pattern: tomllib is Python 3.11+, and this script runs on the GPU machine's Python)."""
    text = (REPO / "pyproject.toml").read_text()
    table = re.search(r"^\[build-system\]\s*$(.*?)(?=^\[)", text, re.MULTILINE | re.DOTALL)
    requires = re.search(r"^requires\s*=\s*\[(.*?)\]", table.group(1) if table else "", re.MULTILINE | re.DOTALL)
    if requires is None:
        raise SystemExit("pyproject.toml names no [build-system] requires")
    return re.findall(r'"([^"]+)"', requires.group(1))


def pack(mnist_root: Path, destination: Path = MNIST_PACK) -> None:
    """The preparation step, where MNIST and a package index are: gzip MNIST's four raw files
    into the repository's mnist-local/, and download the build backend's wheels into
    mnist-local/build/ so that the GPU machine builds the checkout's wheel offline whatever
    setuptools its Python has (none, or one too old for pyproject's build-system)."""
    raw = mnist_root / "MNIST" / "raw"
    destination.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        with (raw / name).open("rb") as source, gzip.open(destination / f"{name}.gz", "wb") as packed:
            shutil.copyfileobj(source, packed)
    print(f"packed {raw} into {destination} ({sum(p.stat().st_size for p in destination.glob('*.gz')) / 1e6:.1f} MB)")
    build = destination / BUILD_WHEELS
    download = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--no-deps"]
    download += ["--only-binary=:all:", "--dest", str(build), *build_requirements()]
    result = subprocess.run(download, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"could not download the build backend into {build}: {result.stderr.strip()[-500:]}")
    print(f"build backend for the offline install: {', '.join(sorted(p.name for p in build.glob('*.whl')))}")


def unpack(packed: Path) -> Path:
    """mnist-local/*.gz -> mnist-local/MNIST/raw/: the torchvision layout the package reads."""
    raw = packed / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        with gzip.open(packed / f"{name}.gz", "rb") as source, (raw / name).open("wb") as target:
            shutil.copyfileobj(source, target)
    return packed


def install(session: Session, folder: Path, packed: Path) -> tuple[dict[str, str], Path]:
    """Build a wheel of the repository and install it into `folder`/site with no index (what an
    offline machine allows). The wheel is built in pip's isolated build environment from the
    backend wheels the preparation step carried (packed/build/): pip needs nothing else, so a
    bare Python's pip does (its own setuptools, if any, is never used). A pack without them
    falls back to the machine's setuptools (--no-build-isolation). Returns the environment the
    later steps run in and where mnistsum_cli should come from; when no wheel can be built or
    installed, the checkout itself (PYTHONPATH), and the check says that the checkout is what
    was tested, so that the other checks still run and count."""
    started = time.monotonic()
    wheels, site = folder / "wheels", folder / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    backend = packed / BUILD_WHEELS
    carried = sorted(backend.glob("*.whl"))
    isolation = ["--find-links", str(backend)] if carried else ["--no-build-isolation"]
    built = session.run(
        "install",
        [*pip, "wheel", "--no-deps", "--no-index", *isolation, "--wheel-dir", str(wheels), str(REPO)],
        BUDGET["setup"],
        cwd=folder,
    )
    installed = (
        built is not None
        and built.returncode == 0
        and session.run(
            "install",
            [
                *pip,
                "install",
                "--no-deps",
                "--no-index",
                "--target",
                str(site),
                *map(str, wheels.glob("mnistsum-*.whl")),
            ],
            BUDGET["setup"],
            cwd=folder,
        ).returncode
        == 0
    )
    built_with = (
        f"built with {', '.join(p.name for p in carried)}" if carried else "built with this Python's setuptools"
    )
    session.record(
        "install offline",
        True,
        started,
        f"{built_with}, into {site}"
        if installed
        else f"no wheel could be built or installed here (see the log): the checks test the checkout {REPO}",
    )
    package_root = site if installed else REPO
    return {**os.environ, "PYTHONPATH": str(package_root), "MNISTSUM_TEST_THREADS": "4"}, package_root


VERSIONS = """
import json, platform, torch, torchvision, mnistsum_cli
cuda = torch.cuda.is_available()
properties = torch.cuda.get_device_properties(0) if cuda else None
print(json.dumps({
    "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
    "gpu": properties.name if cuda else None, "gpu_memory_gib": round(properties.total_memory / 2**30, 1) if cuda else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
    "mnistsum": mnistsum_cli.__version__, "mnistsum_from": mnistsum_cli.__file__,
}))
"""


def versions(session: Session, env: dict[str, str], package_root: Path) -> bool:
    """GPU, driver, CUDA, cuDNN, torch; and that mnistsum_cli comes from the install."""
    started = time.monotonic()
    result = session.run("versions", [sys.executable, "-c", VERSIONS], 60, env, cwd=package_root)
    if result is None or result.returncode != 0:
        return session.record("versions", False, started, "could not import torch or mnistsum_cli (see the log)")
    found = json.loads(result.stdout.strip().splitlines()[-1])
    smi = shutil.which("nvidia-smi")
    driver = (
        subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        if smi
        else None
    )
    found["driver"] = (
        driver.stdout.strip().splitlines()[0] if driver and driver.returncode == 0 and driver.stdout.strip() else None
    )
    session.figures["versions"] = found
    from_install = Path(found["mnistsum_from"]).is_relative_to(package_root)
    ok = from_install and (found["gpu"] is not None or session.dry_run)
    detail = f"{found['gpu'] or 'no GPU'}, driver {found['driver']}, CUDA {found['cuda']}, cuDNN {found['cudnn']}, torch {found['torch']}"
    return session.record(
        "versions", ok, started, detail + ("" if from_install else f"; mnistsum_cli came from {found['mnistsum_from']}")
    )


# --------------------------------------------------------------------------- the checks


def cuda_tests(session: Session, env: dict[str, str], package_root: Path, mnist: Path) -> bool:
    started = time.monotonic()
    xml = session.outdir / "pytest-cuda.xml"
    # only the file that holds them: the GPU machine has pytest but not every test's dependency (hypothesis)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rs",
        f"--junitxml={xml}",
        "--rootdir",
        str(REPO),
        str(REPO / "tests" / "test_cuda.py"),
    ]
    # run from the install folder: `python -m` puts the working folder first on sys.path
    result = session.run(
        "pytest -m cuda",
        command,
        BUDGET["pytest -m cuda"],
        {**env, "MNISTSUM_TEST_MNIST": str(mnist)},
        cwd=package_root,
    )
    if result is None:
        return session.record("pytest -m cuda", False, started, "stopped at its time limit")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "no output"
    session.figures["pytest_cuda"] = {"exit_code": result.returncode, "summary": summary}
    ran = "passed" in summary or "failed" in summary
    ok = result.returncode == 0 and (ran or session.dry_run)  # on a GPU they must run, not skip
    return session.record("pytest -m cuda", ok, started, summary)


def bench(
    session: Session, env: dict[str, str], mnist: Path, sizes: Sizes, name: str, share: float, *args: str
) -> bool:
    """One bench.py run; its JSON (complete or as far as it got) goes into the figures."""
    started = time.monotonic()
    command_args = [
        *sizes.device,
        "--mnist-dir",
        str(mnist),
        "--target",
        TARGET[0],
        "--sum-target",
        TARGET[1],
        *sizes.bench,
        *args,
    ]
    result, report = session.run_script(name, "bench.py", command_args, share, env)
    if report:
        session.figures.setdefault("bench", {})[name] = report
    if result is None:
        done = ", ".join(run["name"] for run in report["runs"]) if report else "nothing"
        return session.record(name, False, started, f"stopped at its time limit; finished: {done}")
    ok = result.returncode == 0 and report is not None
    return session.record(
        name, ok, started, "; ".join(run_line(run) for run in report["runs"]) if report else "no report"
    )


def run_line(run: dict[str, Any]) -> str:
    reached = f"target in {run['time_to_target']:.1f} s" if run["time_to_target"] is not None else "target not reached"
    return f"{run['name']}: {reached}, {run['train_seconds']:.1f} s, {run['images_per_second']:,.0f} img/s"


def profile_default(session: Session, env: dict[str, str], mnist: Path, sizes: Sizes) -> bool:
    started = time.monotonic()
    args = [*sizes.device, "--mnist-dir", str(mnist), "--preset", "default", *sizes.profile]
    result, figures = session.run_script("profile", "profile_steps.py", args, BUDGET["profile"], env)
    if result is None or result.returncode != 0 or figures is None:
        return session.record(
            "profile", False, started, "stopped at its time limit" if result is None else "no profile (see the log)"
        )
    session.figures["profile"] = figures
    busy = "n/a" if figures["gpu_busy_share"] is None else f"{figures['gpu_busy_share']:.0%}"
    return session.record(
        "profile",
        True,
        started,
        f"{figures['per_step']:.0f} {figures['what']} per step, {figures['step_ms']:.1f} ms a step, GPU busy {busy}",
    )


# --------------------------------------------------------------------------- reports


def bench_rows(session: Session) -> list[str]:
    runs = [run for report in session.figures.get("bench", {}).values() for run in report["runs"]]
    if not runs:
        return []
    lines = [
        "",
        f"Time to {float(TARGET[0]):.1%} digit / {float(TARGET[1]):.1%} sum test accuracy (training loop only, "
        "test scoring excluded).",
        "",
        "| run | to target | test digit / sum % | train s | images/s | peak GPU MiB | vs classic |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        to_target = "-" if run["time_to_target"] is None else f"{run['time_to_target']:.1f} s"
        peak = "-" if run["peak_gpu_memory_bytes"] is None else str(round(run["peak_gpu_memory_bytes"] / 2**20))
        speed = run.get("speedup", {})
        vs_classic = (
            "-"
            if speed.get("value") is None
            else f"{'' if speed['bound'] == '=' else speed['bound']}{speed['value']:.2f}x"
        )
        lines.append(
            f"| {run['name']} | {to_target} | {100 * run['final_digit_accuracy']:.2f} / {100 * run['final_sum_accuracy']:.2f} "
            f"| {run['train_seconds']:.1f} | {run['images_per_second']:,.0f} | {peak} | {vs_classic} |"
        )
    return lines


def profile_rows(session: Session) -> list[str]:
    profile = session.figures.get("profile")
    if not profile:
        return []
    busy = "n/a" if profile["gpu_busy_share"] is None else f"{profile['gpu_busy_share']:.0%}"
    lines = [
        "",
        f"Profile of {profile['steps']} steps of the {profile['preset']} preset (batch {profile['batch_size']}): "
        f"{profile['per_step']:.0f} {profile['what']} per step, {profile['step_ms']:.2f} ms a step, "
        f"GPU busy {busy} of the time. Top:",
        "",
    ]
    return lines + [
        f"- {row['ms_per_step']:.3f} ms/step, {row['per_step']:.0f}x: `{row['name']}`" for row in profile["top"][:5]
    ]


def summary_markdown(session: Session) -> str:
    v = session.figures.get("versions", {})
    lines = [
        f"# mnistsum GPU check{' (dry run: CPU, tiny sizes)' if session.dry_run else ''}",
        "",
        f"{v.get('gpu') or 'no GPU'} · driver {v.get('driver')} · CUDA {v.get('cuda')} · cuDNN {v.get('cudnn')} · "
        f"torch {v.get('torch')} · torchvision {v.get('torchvision')} · Python {v.get('python')}",
        "",
        "| check | result | s | detail |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c.name} | {'ok' if c.ok else '**FAILED**'} | {c.seconds:.0f} | {c.detail.replace('|', '/')} |"
        for c in session.checks
    ]
    return "\n".join(lines + bench_rows(session) + profile_rows(session)) + "\n"


def write_reports(session: Session) -> None:
    figures = {"dry_run": session.dry_run, "checks": [asdict(c) for c in session.checks], **session.figures}
    (session.outdir / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    (session.outdir / "summary.md").write_text(summary_markdown(session))


# --------------------------------------------------------------------------- main


def check_all(session: Session, sizes: Sizes, packed: Path) -> None:
    started = time.monotonic()
    try:
        mnist = unpack(packed)
    except OSError as error:
        session.record("unpack MNIST", False, started, f"{error} (run the preparation step: --pack)")
        return
    session.record("unpack MNIST", True, started, f"{packed / 'MNIST' / 'raw'}")
    with tempfile.TemporaryDirectory(prefix="mnistsum-gpu-check-") as tmp:
        env, package_root = install(session, Path(tmp), packed)
        if not versions(session, env, package_root):
            return
        cuda_tests(session, env, package_root, mnist)
        bench(
            session,
            env,
            mnist,
            sizes,
            "classic vs default",
            BUDGET["classic vs default"],
            "--baseline-epochs",
            str(sizes.classic_epochs),
            "--preset",
            "default",
        )
        bench(
            session,
            env,
            mnist,
            sizes,
            "presets",
            BUDGET["presets"],
            "--baseline-epochs",
            "0",
            *(arg for name in sizes.presets for arg in ("--preset", name)),
        )
        profile_default(session, env, mnist, sizes)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See docs/gpu-check.md.")
    parser.add_argument("outdir", type=Path, nargs="?", help="where the log, figures.json and summary.md go")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU: every step but the CUDA-only ones"
    )
    parser.add_argument(
        "--pack",
        type=Path,
        metavar="MNIST_ROOT",
        help="the preparation step: gzip MNIST_ROOT/MNIST/raw into mnist-local/",
    )
    parser.add_argument(
        "--mnist-pack",
        type=Path,
        default=MNIST_PACK,
        help=f"the gzipped MNIST folder (default: {MNIST_PACK.relative_to(REPO)})",
    )
    args = parser.parse_args(argv)
    if (args.pack is None) == (args.outdir is None):
        parser.error("give OUTDIR, or --pack MNIST_ROOT for the preparation step")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.pack:
        pack(args.pack, args.mnist_pack)
        return 0
    args.outdir.mkdir(parents=True, exist_ok=True)
    sizes = DRY if args.dry_run else REAL
    limit = round(HARD_LIMIT * sizes.slack)
    session = Session(args.outdir.resolve(), args.dry_run, sizes.slack, deadline=time.monotonic() + limit)
    session.log.write_text("")

    def out_of_time(signum: int, frame: Any) -> None:
        raise TimeoutError(f"hard limit of {limit} s reached")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(limit)
    try:
        check_all(session, sizes, args.mnist_pack)
    except TimeoutError as error:
        session.record("time limit", False, session.deadline - limit, str(error))
    finally:
        signal.alarm(0)
        write_reports(session)
    failed = [c.name for c in session.checks if not c.ok]
    session.say(
        f"\n{len(session.checks) - len(failed)} checks ok, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; reports in {args.outdir}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
