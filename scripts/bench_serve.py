"""Load benchmark of ``crackclf serve``: a bounded burst of ``POST /predict`` requests with one 227 px image each.

    make bench-serve MODEL=outputs/.../checkpoints/best.ckpt
    .venv/bin/python scripts/bench_serve.py --model runs:/<id> --requests 2000 --concurrency 8

It starts the server itself on 127.0.0.1 (a port the OS assigns, read back from the server; never another host), waits
for ``/healthz``, sends a warm-up, then ``--requests`` requests from ``--concurrency`` keep-alive connections (real
images of the shared data set, round-robin), stops the server, and reports p50/p90/p99 latency, throughput, errors by
kind and the server's resident memory before and after the load, as a table and as JSON (``--out``). It stops by
itself: after the last request, or at ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from _bench import environment, write_json
from crackclf.data.images import list_image_files
from crackclf.serving.commands import bound_url
from crackclf.utils import repo_root

HOST = "127.0.0.1"  # the benchmark never targets another machine
BOUNDARY = "crackclf-bench-boundary"


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample_images(data: Path, count: int) -> list[tuple[str, bytes]]:
    """``count`` real images spread over the class folders, or generated 227 px JPEGs when ``data`` is absent."""
    files = [Path(f) for f in list_image_files(data, folders=False)]  # none when data is absent
    if files:
        step = max(1, len(files) // count)
        return [(p.name, p.read_bytes()) for p in files[::step][:count]]
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        buffer = io.BytesIO()
        pixels = np.clip(rng.normal(170, 15, (227, 227, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        images.append((f"generated-{index}.jpg", buffer.getvalue()))
    return images


def multipart(name: str, data: bytes) -> bytes:
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def wait_healthy(process: subprocess.Popen, log: Path, timeout: float) -> int:
    """The port the server bound (``--port 0``: from its start-up line in ``log``), once ``/healthz`` answers."""
    deadline = time.monotonic() + timeout
    port = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode} before answering /healthz:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
        if port is None:
            url = bound_url(log.read_text(errors="replace"))
            port = int(url.rsplit(":", 1)[1]) if url else None
        try:
            if port is not None:
                connection = http.client.HTTPConnection(HOST, port, timeout=2)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    return port
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer /healthz within {timeout:.0f} s:\n"
                     f"{log.read_text(errors='replace')[-3000:]}")


def http_request(port: int, body: bytes) -> bytes:
    """The whole ``POST /predict`` request, built once: the load generator then only writes bytes."""
    head = (f"POST /predict HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _exchange(reader, writer, request_bytes: bytes) -> int:
    """Send one prepared request on a keep-alive connection and read the whole response; returns the status."""
    writer.write(request_bytes)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next((int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:")),
                  None)
    if length is None:
        raise ConnectionError("response without Content-Length")
    await reader.readexactly(length)
    return status


def run_load(port: int, bodies: list[bytes], requests: int, concurrency: int, deadline: float
             ) -> tuple[list[float], Counter, float, float]:
    """Send ``requests`` requests over ``concurrency`` keep-alive connections; returns latencies (s), errors by
    kind, wall time and the CPU time the load generator itself used (s).

    The load generator shares the 2 cores with the server, so it is kept lean: one asyncio event loop (uvloop when
    installed), requests prepared as bytes up front, responses read by Content-Length. Its own CPU time per request
    is reported (``client_cpu_ms_per_request``); docs/serving.md compares it with ``http.client`` from 8 threads.
    """
    import asyncio

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    prepared = [http_request(port, body) for body in bodies]
    latencies: list[float] = []
    errors: Counter = Counter()
    issued = iter(range(requests))

    async def client() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.monotonic() < deadline and (index := next(issued, None)) is not None:
                started = time.perf_counter()
                try:
                    status = await asyncio.wait_for(_exchange(reader, writer, prepared[index % len(prepared)]), 30)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as error:
                    latencies.append(time.perf_counter() - started)
                    errors[type(error).__name__] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
                    continue
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    errors[f"HTTP {status}"] += 1
        finally:
            writer.close()

    async def load() -> None:
        await asyncio.gather(*(client() for _ in range(concurrency)))

    started, cpu_started = time.perf_counter(), time.process_time()
    loop = loop_factory()
    try:
        loop.run_until_complete(load())
    finally:
        loop.close()
    return latencies, errors, time.perf_counter() - started, time.process_time() - cpu_started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .ckpt or .onnx file, runs:/<run_id> or models:/<name>/<v>")
    parser.add_argument("--data", type=Path, default=repo_root().parent / "shared" / "data" / "concrete_crack",
                        help="images to send (default: the shared data set; generated images when absent)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=100, help="requests sent before measuring (default 100)")
    parser.add_argument("--images", type=int, default=200, help="distinct images sent round-robin (default 200)")
    parser.add_argument("--timeout", type=float, default=600, help="stop everything after this many seconds")
    parser.add_argument("--out", type=Path, default=repo_root() / "bench" / "bench_serve.json")
    parser.add_argument("serve_args", nargs="*", default=[],
                        help="extra `crackclf serve` options after --, e.g. -- --backend torch --workers 2")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")
    started_at = time.monotonic()
    deadline = started_at + args.timeout

    images = sample_images(args.data, args.images)
    bodies = [multipart(name, data) for name, data in images]
    # --port 0: the OS assigns a free port as the server binds it; the server's start-up line (info level, with the
    # access log off) says which. Its messages go to a file beside the JSON report.
    command = [sys.executable, "-m", "crackclf.cli", "serve", "--model", args.model, "--host", HOST, "--port", "0",
               "--log-level", "info", "--no-access-log", *args.serve_args]
    print("server:", " ".join(command), file=sys.stderr)
    log = args.out.with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as stream:
        process = subprocess.Popen(command, cwd=repo_root(), stdout=stream, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        port = wait_healthy(process, log, timeout=min(300.0, args.timeout))
        rss_start = rss_mb(process.pid)
        run_load(port, bodies, args.warmup, args.concurrency, deadline)
        rss_before, cpu_before = rss_mb(process.pid), cpu_seconds(process.pid)
        latencies, errors, wall, client_cpu = run_load(port, bodies, args.requests, args.concurrency, deadline)
        rss_after, cpu_used = rss_mb(process.pid), cpu_seconds(process.pid) - cpu_before
        connection = http.client.HTTPConnection(HOST, port, timeout=10)
        connection.request("GET", "/model")
        model = json.loads(connection.getresponse().read())
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server runs in its own session: nothing else is signalled
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    done = len(latencies)
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    result = {
        "endpoint": "POST /predict (1 image per request)",
        "model": args.model, "backbone": model.get("backbone"), "image_size": model.get("image_size"),
        "backend": model.get("backend"), "serve_args": args.serve_args,
        "image_bytes_mean": round(float(np.mean([len(d) for _, d in images]))),
        "requests": done, "requested": args.requests, "concurrency": args.concurrency,
        "errors": sum(errors.values()) + (args.requests - done), "errors_by_kind": dict(errors),
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p90": round(float(np.percentile(ms, 90)), 2),
                       "p99": round(float(np.percentile(ms, 99)), 2), "mean": round(float(ms.mean()), 2),
                       "max": round(float(ms.max()), 2)},
        "throughput_rps": round(done / wall, 1) if wall > 0 else None, "wall_s": round(wall, 2),
        # CPU time the server spent per request: unlike latency, it hardly depends on what else the machine runs
        "server_cpu_ms_per_request": round(1000 * cpu_used / max(done, 1), 3),
        "client_cpu_ms_per_request": round(1000 * client_cpu / max(done, 1), 3),
        "server_rss_mb": {"started": round(rss_start, 1), "before_load": round(rss_before, 1),
                          "after_load": round(rss_after, 1)},
        **environment(),
    }
    write_json(args.out, result)
    latency = result["latency_ms"]
    rows = [("requests", f"{done} ({args.concurrency} concurrent)"), ("errors", str(result["errors"])),
            ("p50 / p90 / p99 latency", f"{latency['p50']} / {latency['p90']} / {latency['p99']} ms"),
            ("mean / max latency", f"{latency['mean']} / {latency['max']} ms"),
            ("throughput", f"{result['throughput_rps']} requests/s"),
            ("server CPU time per request", f"{result['server_cpu_ms_per_request']} ms"),
            ("load generator CPU time per request", f"{result['client_cpu_ms_per_request']} ms"),
            ("server RSS before → after", f"{rss_before:.0f} → {rss_after:.0f} MiB"),
            ("model", f"{result['backbone']} {result['image_size']} px, {result['backend']} backend"),
            ("CPUs / load average", f"{result['cores']} ({result['cpu']}) / {result['load_average'][0]:.1f}")]
    print("| metric | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"written: {args.out}", file=sys.stderr)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
