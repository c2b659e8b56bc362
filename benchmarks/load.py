"""A bounded load generator for `sdxl-trt serve`: a fixed number of requests from a fixed number of concurrent
clients, loopback only; reports throughput, latency percentiles and errors, and the server's batching (from its
/metrics), as JSON.

    python benchmarks/load.py --engine DIR --out benchmarks/results/cpu-tiny-serve.json \\
        --requests 48 --concurrency 8 --size 128x128 --steps 20 --server-flags "--max-batch 4"

With --engine it starts the server itself (on a free loopback port, stopped at the end); with --url it uses a
running one (127.0.0.1 / localhost / ::1 only).
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from sdxl_trt.runtime.bench import percentile

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def post(url: str, body: dict, timeout: float) -> tuple[int, float, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/images/generations", data=data,
                                     headers={"content-type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            answer = json.loads(r.read())
            return r.status, time.perf_counter() - started, answer.get("timings", {})
    except urllib.error.HTTPError as e:
        return e.code, time.perf_counter() - started, {}
    except OSError as e:
        return 0, time.perf_counter() - started, {"error": str(e)}


def metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def start_server(engine: str, flags: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "sdxl_trt.runtime.cli", "serve", engine, "--port", str(port),
                                *shlex.split(flags)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("load.py: the server exited while starting")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("load.py: the server did not become healthy in 300 s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--engine", help="start `sdxl-trt serve ENGINE` for the run")
    where.add_argument("--url", help="a running server on this machine")
    p.add_argument("--server-flags", default="", help="extra flags for the server started with --engine")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--size", default="128x128")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        raise SystemExit("load.py: --requests and --concurrency must be at least 1")
    process = None
    if args.engine:
        process, url = start_server(args.engine, args.server_flags)
    else:
        url = args.url.rstrip("/")
        if urllib.parse.urlparse(url).hostname not in LOOPBACK:
            raise SystemExit(f"load.py: {url} is not on this machine; the load generator only talks to loopback")
    try:
        before = metrics(url)
        bodies = [{"prompt": f"a lighthouse at dawn, variation {i}", "size": args.size, "steps": args.steps,
                   "n": args.n, "seed": i} for i in range(args.requests)]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(lambda b: post(url, b, args.timeout), bodies))
        wall = time.perf_counter() - started
        after = metrics(url)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    ok = [a for a in answers if a[0] == 200]
    latencies = [a[1] for a in ok]
    errors: dict[str, int] = {}
    for a in answers:
        if a[0] != 200:
            errors[str(a[0])] = errors.get(str(a[0]), 0) + 1
    calls = after.get("sdxl_batch_requests_count", 0) - before.get("sdxl_batch_requests_count", 0)
    result = {
        "command": shlex.join(["python", *sys.argv]), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "server_flags": args.server_flags, "requests": args.requests, "concurrency": args.concurrency,
        "size": args.size, "steps": args.steps, "n": args.n, "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3), "images_per_s": round(len(ok) * args.n / wall, 3),
        "latency_s": {"p50": round(percentile(latencies, 50), 3), "p95": round(percentile(latencies, 95), 3),
                      "p99": round(percentile(latencies, 99), 3), "mean": round(statistics.mean(latencies), 3)}
        if latencies else None,
        "errors": errors, "pipeline_calls": calls,
        "requests_per_call": round(len(ok) / calls, 2) if calls else None,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
