"""The commands that use a trained model: `predict` (image files or a dataset row), `export`
(model.onnx) and `serve` (a drawing page and a JSON API). predict and serve answer on torch or,
with --runtime onnx, on onnxruntime without torch."""

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from mnistsum_cli import terminal
from mnistsum_cli.cli import preflight, report
from mnistsum_cli.cli.commands import Command, app
from mnistsum_cli.cli.options import (
    ArtifactsOption,
    CpuOption,
    DataOption,
    GpuOption,
    MnistDirOption,
    RuntimeOption,
    split_option,
)
from mnistsum_cli.errors import BadOption, MnistsumError
from mnistsum_cli.serve.workers import MAX_DEFAULT_WORKERS
from mnistsum_cli.store.paths import DEFAULT_ARTIFACTS, DEFAULT_DATA, IMAGE_FILE_FORMATS, DataDir, RunDir, formats_text
from mnistsum_cli.store.schemas import MODEL_META


@app.command(
    cls=Command,
    epilog="Examples: mnistsum predict seven.png --number 5 · mnistsum predict a.png b.jpg --number 3 --json · "
    "mnistsum predict --index 42 --split test",
)
def predict(
    images: Annotated[
        Optional[List[Path]],
        typer.Argument(
            metavar="IMAGE...",
            help=f"{formats_text(IMAGE_FILE_FORMATS)} files, any size or colour.",
            show_default=False,
        ),
    ] = None,
    number: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            max=9,
            help="The number 0-9 to add; with --index it replaces the row's number (default: the row's).",
            show_default=False,
        ),
    ] = None,
    index: Annotated[
        Optional[int], typer.Option(min=0, help="Predict row K of --split instead of files.", show_default=False)
    ] = None,
    split: split_option("Split whose row --index predicts.") = "test",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: an object for one image, a list for several.")
    ] = False,
    data: DataOption = DEFAULT_DATA,
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    mnist_dir: MnistDirOption = None,
    gpu: GpuOption = None,
    cpu: CpuOption = False,
    runtime: RuntimeOption = "torch",
) -> None:
    """Predict the digit and the sum for image files or a dataset row.

    Images are brought to MNIST form: greyscale, inverted when the background is light, the digit scaled to 20 px and centred by its centre of mass in 28 x 28. --runtime onnx answers with model.onnx on onnxruntime (image files load no torch); the output names the runtime.
    """
    if index is None and not images:
        raise BadOption("give image files with --number N, or --index K to predict a dataset row")
    if index is not None and images:
        raise BadOption("give either image files or --index, not both")
    if images and number is None:
        raise BadOption("--number N (0-9) is required with image files")
    preflight.refuse_impossible_device(gpu, cpu, runtime)
    preflight.require_inputs(
        (RunDir(artifacts).model, MODEL_META), *(preflight.splits(data) if index is not None else [])
    )
    if index is not None:
        from mnistsum_cli.data.splitdata import SplitData, check_row

        prepared = SplitData(DataDir(data), mnist_dir)
        check_row(index, split, prepared.header.rows[split])  # Parquet metadata, kept for MNIST's folder
    else:
        preflight.image_files(images)
    from mnistsum_cli.evaluation.onnx_runtime import onnx_extra
    from mnistsum_cli.evaluation.predict import predict_files, predict_row

    device = preflight.runtime_device(runtime, gpu, cpu)
    with onnx_extra("predict --runtime onnx"):
        if index is not None:
            results = [predict_row(index, split, number, prepared, RunDir(artifacts), device, runtime)]
        else:
            results = predict_files(images, number, RunDir(artifacts), device, runtime)
    if as_json:
        terminal.print_json(results[0] if len(results) == 1 else results)
    else:
        report.predictions_table(results)


@app.command(
    cls=Command,
    epilog="Examples: mnistsum export · mnistsum export --out lean.onnx --opset 20 · "
    "mnistsum predict seven.png --number 5 --runtime onnx",
)
def export(
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="ONNX file to write (default: <artifacts>/model.onnx).", show_default=False),
    ] = None,
    opset: Annotated[
        Optional[int],
        typer.Option(metavar="N", help="ONNX opset of the graph (default: the exporter's).", show_default=False),
    ] = None,
    data: DataOption = DEFAULT_DATA,
    mnist_dir: MnistDirOption = None,
) -> None:
    """Export the run's model as model.onnx, for onnxruntime and other ONNX runtimes.

    One file, weights inside; inputs: images uint8 [N, 28, 28] in MNIST form (normalised inside the graph) and numbers int64 [N]; outputs: both heads' probabilities and logits (docs/export.md). Before it is written, onnxruntime and torch must agree on the whole test split of --data. Needs the onnx extra: pip install 'mnistsum\\[onnx]'.
    """
    from mnistsum_cli.evaluation.onnx_runtime import onnx_extra

    with onnx_extra("export"):
        from mnistsum_cli.data.splitdata import SplitData
        from mnistsum_cli.export import export_model

        exported = export_model(RunDir(artifacts), SplitData(DataDir(data), mnist_dir), out, opset)
    report.export_summary(exported)


@app.command(cls=Command, epilog="Example: mnistsum serve --artifacts artifacts --cpu  (then open the URL it prints)")
def serve(
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    host: Annotated[
        str,
        typer.Option(metavar="ADDRESS", help="Address to listen on; anything but loopback lets others use the model."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to listen on (0: any free port).")] = 8000,
    gpu: GpuOption = None,
    cpu: CpuOption = False,
    workers: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help=f"Server processes sharing the port (default: one per core it may use, by its affinity mask and its cgroup's CPU quota, at most {MAX_DEFAULT_WORKERS}, on the CPU; 1 on a GPU).",
            show_default=False,
        ),
    ] = None,
    runtime: RuntimeOption = "torch",
) -> None:
    """Serve a local page to draw a digit and pick a number, and a JSON API, until Ctrl-C.

    The page shows both heads' answers with their probabilities and the 28 x 28 image the model saw (prepared as by predict). The model follows --artifacts: a newly trained model.safetensors answers the next request (with --runtime onnx, a newly exported model.onnx of it). Needs the serve extra: pip install 'mnistsum\\[serve]'.
    """
    preflight.refuse_impossible_device(gpu, cpu, runtime)
    if RunDir(artifacts).root.is_dir():  # else serve says the folder is missing
        preflight.require_inputs((RunDir(artifacts).model, MODEL_META))
    try:
        from mnistsum_cli.serve.lifecycle import serve as serve_stage
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in ("starlette", "uvicorn", "python_multipart"):
            raise
        raise MnistsumError(
            f"`mnistsum serve` needs Starlette, uvicorn and python-multipart ({error.name} is missing): "
            "pip install 'mnistsum[serve]'"
        ) from None

    from mnistsum_cli.evaluation.onnx_runtime import onnx_extra

    device = preflight.runtime_device(runtime, gpu, cpu)
    with onnx_extra("serve --runtime onnx"):
        serve_stage(RunDir(artifacts), host, port, device, workers, typer.echo, terminal.warning, runtime)
