"""Load on `mnistsum serve`: N concurrent clients on loopback post a drawn digit (a 140 x 140
PNG, as the page sends its pad; --size 280 posts the whole pad) for a bounded number of
requests and seconds; reports requests/s, p50/p95/p99 latency, errors and the server's memory
over the run, side by side with what a user pays without the server: `mnistsum predict` of
one file as a process.

    python bench/serve_load.py --artifacts artifacts --workers 1 2 --clients 1 8 --requests 10000
    python bench/serve_load.py --runtime onnx ...   # model.onnx on onnxruntime (`mnistsum export` first)

One server per --workers value (`python -m mnistsum_cli serve --cpu --port 0 --workers W`) is
started here and stopped with Ctrl-C after its rows. The clients are threads of this process,
each with one keep-alive connection, sending a request prepared once and reading the reply with
a minimal HTTP/1.1 parser (about 0.05 ms of CPU per request, against several times that for
http.client), so that the figures are the server's; client and server share the machine's
cores, as they would on a user's laptop. Memory is the proportional set size (PSS) of the server
and its workers together: pages they share (the forked model, the libraries) count once.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Optional
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
NUMBER = 3
SENT_SIZE = 140  # the side of the PNG the page sends (mnistsum_cli/static/app.js: the 280 px pad at half size)


def drawing_png(size: int = SENT_SIZE) -> bytes:
    """A seven in black ink on the white 280 x 280 pad, as the page sends it: Chromium's canvas
    gives an RGBA PNG (alpha 255) with antialiased strokes (drawn here at 4x and reduced), and
    the page sends it at `size` px."""
    from PIL import Image, ImageDraw

    scale, width = 4, 22 * 4  # the page's pen is 22 px wide on the pad
    points = [(84 * scale, 56 * scale), (196 * scale, 56 * scale), (126 * scale, 238 * scale)]
    image = Image.new("RGB", (280 * scale, 280 * scale), "white")
    pen = ImageDraw.Draw(image)
    pen.line(points, fill="black", width=width, joint="curve")
    for x, y in (points[0], points[-1]):  # round caps, as the page's lineCap
        pen.ellipse((x - width // 2, y - width // 2, x + width // 2, y + width // 2), fill="black")
    buffer = io.BytesIO()
    image.resize((size, size), Image.Resampling.BOX).convert("RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def start_server(artifacts: Path, workers: int, log: IO[str], runtime: str = "torch") -> tuple[subprocess.Popen, str]:
    """`mnistsum serve --runtime RUNTIME` on a free loopback port, its stderr into `log` (a pipe
    nobody reads would fill up and stall it); returns the process and its host:port."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mnistsum_cli",
            "serve",
            "--artifacts",
            str(artifacts),
            "--cpu",
            "--port",
            "0",
            "--workers",
            str(workers),
            "--runtime",
            runtime,
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    first = process.stdout.readline()
    if " at http://" not in first:
        process.kill()
        log.seek(0)
        raise SystemExit(f"serve did not start: {first}{log.read()}".strip())
    return process, urlsplit(first.split(" at ")[1].split()[0]).netloc


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=60)
    finally:
        process.kill()


def server_pss_mib(pid: int) -> float:
    """Proportional set size of the server and its worker processes, summed."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total_kib = 0
    for process in [pid, *map(int, children)]:
        try:
            lines = Path(f"/proc/{process}/smaps_rollup").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):  # a worker that has just exited
            continue
        total_kib += sum(int(line.split()[1]) for line in lines if line.startswith("Pss:"))
    return total_kib / 1024


@dataclass
class LoadResult:
    runtime: str
    workers: int
    clients: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    pss_start_mib: float  # after the first tenth of the requests (warm)
    pss_end_mib: float
    pss_max_mib: float


def percentile(sorted_values: list[float], share: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


class Client:
    """One keep-alive connection posting the same prepared request again and again."""

    def __init__(self, address: str, request: bytes) -> None:
        self.address, self.request = address, request
        self.connection: Optional[socket.socket] = None
        self.buffer = b""

    def post(self) -> bool:
        """One request and its whole reply: True for a 200 with a prediction."""
        try:
            if self.connection is None:
                host, port = self.address.rsplit(":", 1)
                self.connection = socket.create_connection((host, int(port)), timeout=30)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connection.sendall(self.request)
            head = self._read_until(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = self._read_exactly(length)
            return head.startswith(b"HTTP/1.1 200 ") and body.startswith(b'{"digit":')
        except (OSError, ValueError, StopIteration):
            self.close()
            return False

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._receive()
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def _read_exactly(self, length: int) -> bytes:
        while len(self.buffer) < length:
            self._receive()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return body

    def _receive(self) -> None:
        chunk = self.connection.recv(65536)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.connection, self.buffer = None, b""


def predict_request(address: str, body: bytes) -> bytes:
    head = (
        f"POST /api/predict?number={NUMBER} HTTP/1.1\r\nHost: {address}\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def load(
    address: str,
    body: bytes,
    workers: int,
    clients: int,
    requests: int,
    max_seconds: float,
    server_pid: int,
    runtime: str = "torch",
) -> LoadResult:
    """`requests` POST /api/predict spread over `clients` threads, stopping early at `max_seconds`."""
    request = predict_request(address, body)
    latencies: list[float] = []
    errors, issued = [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        connection = Client(address, request)
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= requests:
                    break
                issued[0] += 1
            start = time.perf_counter()
            ok = connection.post()
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    memory: list[float] = []
    while any(thread.is_alive() for thread in threads):
        time.sleep(0.2)
        if len(latencies) >= requests // 10:  # warm: model loaded, caches filled
            memory.append(server_pss_mib(server_pid))
    seconds = time.perf_counter() - started
    memory.append(server_pss_mib(server_pid))
    ordered = sorted(latencies)
    return LoadResult(
        runtime=runtime,
        workers=workers,
        clients=clients,
        requests=len(ordered),
        errors=errors[0],
        seconds=round(seconds, 2),
        requests_per_s=round(len(ordered) / seconds, 1),
        p50_ms=round(1000 * percentile(ordered, 0.50), 2),
        p95_ms=round(1000 * percentile(ordered, 0.95), 2),
        p99_ms=round(1000 * percentile(ordered, 0.99), 2),
        pss_start_mib=round(memory[0], 1),
        pss_end_mib=round(memory[-1], 1),
        pss_max_mib=round(max(memory), 1),
    )


def predict_process_seconds(artifacts: Path, image: Path, runs: int, runtime: str = "torch") -> list[float]:
    """Wall seconds of `mnistsum predict IMAGE --number N --cpu --runtime RUNTIME` as a fresh
    process, `runs` times."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mnistsum_cli",
                "predict",
                str(image),
                "--number",
                str(NUMBER),
                "--cpu",
                "--artifacts",
                str(artifacts),
                "--runtime",
                runtime,
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=True,
            capture_output=True,
        )
        times.append(round(time.perf_counter() - start, 3))
    return times


def run_bench(
    artifacts: Path,
    workers: list[int],
    clients: list[int],
    requests: int,
    max_seconds: float,
    predict_runs: int,
    size: int = SENT_SIZE,
    runtime: str = "torch",
) -> dict:
    """The whole measurement on one runtime: one server per workers value with one load run per
    client count, then the `predict` runs."""
    body, load_before = drawing_png(size), os.getloadavg()  # other jobs on the machine skew every figure
    rows, exit_codes = [], []
    for count in workers:
        with tempfile.TemporaryFile("w+") as log:
            process, address = start_server(artifacts, count, log, runtime)
            try:
                rows += [
                    asdict(load(address, body, count, n, requests, max_seconds, process.pid, runtime)) for n in clients
                ]
            finally:
                exit_codes.append(stop_server(process))
    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "seven.png"
        image.write_bytes(body)
        predict_times = predict_process_seconds(artifacts, image, predict_runs, runtime)
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "runtime": runtime,
        "png": {"side_px": size, "bytes": len(body)},
        "serve": rows,
        "serve_exit_codes": exit_codes,
        "predict_process_s": predict_times,
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="a trained run (default: artifacts)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="serve --workers, one server each (default: 1 2)"
    )
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients, one run each (default: 1 8)"
    )
    parser.add_argument(
        "--size", type=int, default=SENT_SIZE, help=f"side of the posted PNG (default: {SENT_SIZE}, as the page sends)"
    )
    parser.add_argument("--requests", type=int, default=10_000, help="requests per run (default: 10000)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop a run after this long (default: 600)")
    parser.add_argument("--predict-runs", type=int, default=3, help="`predict` processes to time (default: 3)")
    parser.add_argument(
        "--runtime", choices=("torch", "onnx"), default="torch", help="serve --runtime and predict --runtime"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not (args.artifacts / "model.safetensors").is_file():
        raise SystemExit(f"error: {args.artifacts}/model.safetensors not found: train a model first")
    if min(args.workers + args.clients) < 1 or args.requests < 1 or args.predict_runs < 1 or args.size < 1:
        raise SystemExit("error: --workers, --clients, --requests, --predict-runs and --size must be 1 or more")
    results = run_bench(
        args.artifacts,
        args.workers,
        args.clients,
        args.requests,
        args.max_seconds,
        args.predict_runs,
        args.size,
        args.runtime,
    )
    loads = " / ".join(
        ", ".join(f"{x:.2f}" for x in results[key]) for key in ("load_average_before", "load_average_after")
    )
    print(f"machine: {results['machine']}; load average (1, 5, 15 min) before / after: {loads}")
    print(f"posting a {args.size} x {args.size} PNG of {results['png']['bytes']:,} bytes")
    print(
        f"{'workers':>7} {'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'PSS MiB start→end (max)':>24}"
    )
    for row in results["serve"]:
        print(
            f"{row['workers']:>7} {row['clients']:>7} {row['requests']:>8} {row['errors']:>6} {row['requests_per_s']:>7} "
            f"{row['p50_ms']:>7} {row['p95_ms']:>7} {row['p99_ms']:>7} "
            f"{row['pss_start_mib']:>11} → {row['pss_end_mib']} ({row['pss_max_mib']})"
        )
    times = sorted(results["predict_process_s"])
    print(
        f"`mnistsum predict` of one file as a process: median {1000 * times[len(times) // 2]:.0f} ms ({len(times)} runs: {times})"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
