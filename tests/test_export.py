"""`mnistsum export` and the onnx runtime of `predict`: every architecture exports and agrees with
torch, the graph is what docs/export.md says, and every way it can go wrong is one line."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_startup import HEAVY, python

from conftest import VAL_SIZE, FakeMnist, _main, assert_one_line_error, publish_model, snapshot
from mnistsum_cli.data.mnist import MNIST_DIR_ENV
from mnistsum_cli.store.fingerprints import fingerprint_file
from mnistsum_cli.store.paths import RunDir
from mnistsum_cli.store.schemas import MODEL_META
from mnistsum_cli.training.checkpoint import load_model, model_bytes
from mnistsum_cli.training.inference import head_probabilities
from mnistsum_cli.training.models import ARCHITECTURES

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(fake_mnist: FakeMnist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder of the synthetic MNIST (read-only)."""
    data = tmp_path_factory.mktemp("export-data") / "data"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv(MNIST_DIR_ENV, raising=False)
        assert _main("prepare", "--mnist-dir", fake_mnist.root, "--val-size", VAL_SIZE, "--data", data) == 0
    return data


@pytest.fixture(scope="module")
def exported(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """For every architecture, an artifacts folder trained one epoch and exported once (read-only):
    built on first use, shared by the tests."""
    runs: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in runs:
            artifacts = tmp_path_factory.mktemp(f"export-{arch}") / "artifacts"
            train = ("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--arch", arch)
            assert _main(*train, "--data", prepared, "--artifacts", artifacts) == 0
            assert _main("export", "--data", prepared, "--artifacts", artifacts) == 0
            runs[arch] = artifacts
        return runs[arch]

    return get


@pytest.fixture
def lean_copy(exported, prepared: Path, in_tmp: Path) -> Path:
    """A private copy of the exported lean run as ./artifacts, and the data as ./data."""
    shutil.copytree(exported("lean"), in_tmp / "artifacts")
    shutil.copytree(prepared, in_tmp / "data")
    return in_tmp / "artifacts"


def digit_png(path: Path, box: tuple[int, int, int, int] = (12, 6, 18, 30)) -> Path:
    image = np.zeros((36, 30), dtype=np.uint8)
    image[box[1] : box[3], box[0] : box[2]] = 255
    Image.fromarray(image).save(path)
    return path


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_exports_and_agrees_with_torch(exported, arch: str) -> None:
    run = RunDir(exported(arch))
    assert sorted(path.name for path in run.root.iterdir() if "onnx" in path.name) == ["model.onnx"]  # no .data
    proto = onnx.load(str(run.onnx))
    onnx.checker.check_model(proto, full_check=True)
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    model, model_meta = load_model(run.model, torch.device("cpu"))
    assert meta["arch"] == arch and meta["run_id"] == model_meta["run_id"]
    assert meta["dataset_id"] == model_meta["dataset_id"]
    assert meta["model_sha256"] == fingerprint_file(run.model, MODEL_META)
    assert "uint8 [N, 28, 28]" in meta["inputs"] and "identical digit and sum on every row" in meta["check"]
    session = onnxruntime.InferenceSession(str(run.onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "numbers"]
    rng = np.random.default_rng(0)
    for batch in (1, 7, 1000):  # the batch axis is dynamic
        images = rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8)
        numbers = rng.integers(0, 10, batch).astype(np.int64)
        digit, total = session.run(["digit_probabilities", "sum_probabilities"], {"images": images, "numbers": numbers})
        expected = head_probabilities(model, torch.from_numpy(images), torch.from_numpy(numbers), torch.device("cpu"))
        assert digit.shape == (batch, 10) and total.shape == (batch, 19)
        assert (digit.argmax(1) == expected[0].numpy().argmax(1)).all()
        assert (total.argmax(1) == expected[1].numpy().argmax(1)).all()
        assert np.abs(digit - expected[0].numpy()).max() <= 1e-4 and np.abs(total - expected[1].numpy()).max() <= 1e-4


def test_export_prints_the_agreement_and_status_shows_it(lean_copy: Path, run_cli) -> None:
    code, out, err = run_cli("export")
    assert code == 0, err
    assert re.search(r"agrees with torch on \d+ test rows: identical digit and sum on every row, max \|Δp\|", out)
    assert "wrote artifacts/model.onnx" in out
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    export = {stage["stage"]: stage for stage in json.loads(out)}["export"]
    assert export["state"] == "up to date" and export["figures"]["arch"] == "lean"


def test_predict_with_onnx_equals_predict(lean_copy: Path, in_tmp: Path, run_cli) -> None:
    images = [digit_png(in_tmp / "one.png"), digit_png(in_tmp / "wide.png", (4, 8, 26, 28))]
    answers = {}
    for runtime in ("torch", "onnx"):
        code, out, err = run_cli("predict", *images, "--number", 4, "--json", "--cpu", "--runtime", runtime)
        assert code == 0, err
        answers[runtime] = json.loads(out)
        assert {result["runtime"] for result in answers[runtime]} == {runtime}
    for torch_row, onnx_row in zip(answers["torch"], answers["onnx"]):
        assert {k: v for k, v in torch_row.items() if "confidence" not in k and k != "runtime"} == {
            k: v for k, v in onnx_row.items() if "confidence" not in k and k != "runtime"
        }
        assert abs(torch_row["digit_confidence"] - onnx_row["digit_confidence"]) < 1e-5
        assert abs(torch_row["sum_confidence"] - onnx_row["sum_confidence"]) < 1e-5
    code, out, err = run_cli("predict", "--index", 5, "--runtime", "onnx")
    assert code == 0, err
    assert "answered by onnx" in out
    code, out, err = run_cli("predict", "--index", 5, "--runtime", "onnx", "--gpu", 0)
    assert code == 2 and "drop --gpu" in assert_one_line_error(err, out)


def test_predict_with_onnx_imports_no_torch(lean_copy: Path, in_tmp: Path) -> None:
    png = digit_png(in_tmp / "one.png")
    result = python(
        "import sys, json\nfrom mnistsum_cli.cli.app import main\n"
        f"try:\n    main(['predict', {str(png)!r}, '--number', '3', '--json', '--runtime', 'onnx', "
        f"'--artifacts', {str(lean_copy)!r}])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"print('LOADED:', *[name for name in {HEAVY!r} if name in sys.modules])"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["runtime"] == "onnx"
    assert result.stdout.splitlines()[-1] == "LOADED: PIL onnxruntime"  # PIL prepares the image; no torch, no onnx


def test_status_reads_the_export_without_onnx_or_torch(lean_copy: Path) -> None:
    result = python(
        "import sys\nfrom mnistsum_cli.cli.app import main\n"
        f"try:\n    main(['status', '--artifacts', {str(lean_copy)!r}])\nexcept SystemExit:\n    pass\n"
        "print('LOADED:', *[name for name in ('torch', 'onnx', 'onnxruntime', 'onnxscript') if name in sys.modules])"
    )
    assert result.returncode == 0, result.stderr
    assert "export" in result.stdout and result.stdout.splitlines()[-1] == "LOADED:"


def test_a_stale_export_is_refused(lean_copy: Path, in_tmp: Path, run_cli) -> None:
    run = RunDir(lean_copy)
    model, meta = load_model(run.model, torch.device("cpu"))
    with torch.no_grad():
        model.digit_head.bias.add_(1.0)
    publish_model(run, model_bytes(model, meta))  # as a new `train` would: model.onnx is now another model's
    png = digit_png(in_tmp / "one.png")
    code, out, err = run_cli("predict", png, "--number", 1, "--runtime", "onnx")
    assert code == 1
    assert "model.onnx is stale (exported from another model.safetensors" in assert_one_line_error(err, out)
    code, out, err = run_cli("status", "--json")
    assert {stage["stage"]: stage["state"] for stage in json.loads(out)}["export"] == "stale"
    assert run_cli("export")[0] == 0  # exporting again makes it current
    assert run_cli("predict", png, "--number", 1, "--runtime", "onnx")[0] == 0


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _weight_flipped(data: bytes) -> bytes:
    middle = bytearray(data)
    middle[len(data) // 2] ^= 0x40
    return bytes(middle)


def _not_onnx(data: bytes) -> bytes:
    return b"PK\x03\x04 not an onnx file at all" * 10


@pytest.mark.parametrize("damage", [_truncated, _weight_flipped, _not_onnx], ids=lambda f: f.__name__[1:])
def test_a_damaged_export_is_refused(lean_copy: Path, in_tmp: Path, run_cli, damage) -> None:
    run = RunDir(lean_copy)
    run.onnx.write_bytes(damage(run.onnx.read_bytes()))
    code, out, err = run_cli("predict", digit_png(in_tmp / "one.png"), "--number", 1, "--runtime", "onnx")
    assert code == 1
    assert "model.onnx" in assert_one_line_error(err, out) and "rerun `mnistsum export`" in err
    code, out, err = run_cli("status", "--json")
    assert {stage["stage"]: stage["state"] for stage in json.loads(out)}["export"] == "invalid"


def test_predict_without_an_export_says_how_to_make_one(workdir: Path, run_cli) -> None:
    code, out, err = run_cli("predict", "--index", 0, "--runtime", "onnx")
    assert code == 1 and "run `mnistsum export` first" in assert_one_line_error(err, out)


@pytest.mark.parametrize("opset", [17, 99])
def test_an_opset_out_of_range_is_a_usage_error(lean_copy: Path, run_cli, opset: int) -> None:
    before = snapshot(lean_copy)
    code, out, err = run_cli("export", "--opset", opset)
    assert code == 2 and f"--opset {opset}" in assert_one_line_error(err, out)
    assert snapshot(lean_copy) == before


def test_an_opset_onnxruntime_lacks_is_refused(lean_copy: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime runs every opset this onnx writes; an older one (simulated) refuses opset 21 and up."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    real = onnxruntime.InferenceSession

    def older_onnxruntime(data, *args, **kwargs):
        opset = onnx.load_from_string(data).opset_import[0].version
        if opset > 20:
            raise Fail(f"ONNX Runtime only supports opset 20 and below, the model has opset {opset}")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", older_onnxruntime)
    RunDir(lean_copy).onnx.unlink()
    before = snapshot(lean_copy)
    code, out, err = run_cli("export", "--opset", 21)
    assert code == 1
    assert "cannot run it (ONNX Runtime only supports opset 20" in assert_one_line_error(err, out)
    assert "a lower --opset" in err
    assert snapshot(lean_copy) == before
    assert run_cli("export", "--opset", 20)[0] == 0


def test_a_graph_that_disagrees_is_not_written(lean_copy: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import mnistsum_cli.data.tensors

    RunDir(lean_copy).onnx.unlink()
    before = snapshot(lean_copy)
    real = mnistsum_cli.data.tensors.normalise
    # the graph normalises its pixels another way than torch's model sees them
    monkeypatch.setattr(mnistsum_cli.data.tensors, "normalise", lambda images: real(255 - images))
    code, out, err = run_cli("export")
    assert code == 1
    assert "onnxruntime disagrees with torch" in assert_one_line_error(err, out) and "not written" in err
    assert snapshot(lean_copy) == before


def test_a_read_only_folder_is_one_line(lean_copy: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import mnistsum_cli.store.transactions

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(mnistsum_cli.store.transactions, "write_file", read_only)
    before = snapshot(lean_copy)
    code, out, err = run_cli("export")
    assert code == 1
    assert "Read-only file system; nothing was changed" in assert_one_line_error(err, out)
    assert snapshot(lean_copy) == before


@pytest.mark.parametrize(
    "argv, module",
    [
        (["export"], "onnx"),
        (["export"], "onnxscript"),
        (["run", "--cpu", "--export", "--epochs", "2"], "onnxscript"),
        (["predict", "--index", "0", "--runtime", "onnx"], "onnxruntime"),
    ],
)
def test_a_missing_extra_says_how_to_install_it(
    lean_copy: Path, run_cli, monkeypatch: pytest.MonkeyPatch, argv: list[str], module: str
) -> None:
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    before = snapshot(lean_copy)
    code, out, err = run_cli(*argv)
    assert code == 1
    assert f"({module} is missing): pip install 'mnistsum[onnx]'" in assert_one_line_error(err, out)
    assert snapshot(lean_copy) == before


def test_out_writes_elsewhere_and_never_over_the_run(lean_copy: Path, in_tmp: Path, run_cli) -> None:
    generation = (lean_copy / ".mnistsum-generation").read_bytes()
    code, out, err = run_cli("export", "--out", in_tmp / "elsewhere" / "lean.onnx")
    assert code == 0, err
    assert onnx.load(str(in_tmp / "elsewhere" / "lean.onnx")).graph.input[0].name == "images"
    assert run_cli("export", "--out", lean_copy / "model.onnx")[0] == 0
    assert (lean_copy / ".mnistsum-generation").read_bytes() != generation  # a commit of the run folder
    before = snapshot(lean_copy)
    code, out, err = run_cli("export", "--out", lean_copy / "model.safetensors")
    assert code == 2 and "a file of the run itself" in assert_one_line_error(err, out)
    assert snapshot(lean_copy) == before


def test_a_new_run_sets_the_export_aside(lean_copy: Path, run_cli) -> None:
    run_id = json.loads((lean_copy / "train_state.json").read_text())["run_id"]
    code, out, err = run_cli("train", "--preset", "cpu", "--cpu", "--epochs", 1, "--seed", 5)
    assert code == 0, err
    assert not (lean_copy / "model.onnx").exists()
    assert (lean_copy / "previous" / run_id / "model.onnx").is_file()


def test_run_export_exports_once(lean_copy: Path, run_cli) -> None:
    RunDir(lean_copy).onnx.unlink()
    args = ("run", "--cpu", "--export")
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "export: not done yet, running it" in err and (lean_copy / "model.onnx").is_file()
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "export: up to date" in out


def test_export_bench_smoke(lean_copy: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/export_bench.py on tiny counts: both runtimes serve, predict and run the test split
    (its figures are measured by running it, not here)."""
    import importlib.util

    pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[dev]'")
    spec = importlib.util.spec_from_file_location("export_bench", REPO / "bench" / "export_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "export_bench", bench)
    spec.loader.exec_module(bench)
    results = bench.run_all(lean_copy, in_tmp / "data", [1], [2], 20, 120, predict_runs=1, repeats=1)
    assert [(row["runtime"], row["errors"], row["requests"]) for row in results["serve"]] == [
        ("torch", 0, 20),
        ("onnx", 0, 20),
    ]
    assert results["serve_exit_codes"] == {"torch": [0], "onnx": [0]}
    for times in results["predict_process"].values():
        assert len(times["wall_s"]) == len(times["cpu_s"]) == 1 and 0 < times["cpu_s"][0] < 60 * times["wall_s"][0]
    assert {runtime: figures["rows"] for runtime, figures in results["throughput"].items()} == {
        "torch": 120,
        "onnx": 120,
    }


def test_the_docs_example_runs(exported, tmp_path: Path) -> None:
    page = (REPO / "docs" / "export.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 1
    shutil.copy(exported("lean") / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "example.py").write_text(blocks[0])
    result = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("images: uint8 [N, 28, 28]")
    assert len(lines) == 3 and all(re.fullmatch(r"digit \d, sum \d+", line) for line in lines[1:])
