"""A bounded load generator for `sdxl-trt serve`: a fixed number of requests from a fixed number of concurrent
clients, loopback only; reports throughput, latency percentiles and errors, and the server's batching (from its
/metrics), as JSON.

    python benchmarks/load.py --engine DIR --out benchmarks/results/cpu-tiny-serve.json \\
        --requests 48 --concurrency 8 --size 128x128 --steps 20 --server-flags "--max-batch 4"

With --engine it starts the server itself (on a free loopback port, stopped at the end); with --url it uses a
running one (127.0.0.1 / localhost / ::1 only).

--mixed: the sizes users pick among. Requests go over `--sizes` (default: the nine SDXL buckets) in a seeded random
order (every size at least once) from `--concurrency` clients (default 1: one at a time), then `--steady-runs` more
per size back to back give each size's steady latency in the same run. Records requests[] (width, height,
latency_ms, in the order sent), steady[] (width, height, latency_ms: the median), each request's ratio to its size's
steady latency, p50/p95/p99, requests_per_s, the server's warm-up (its start until /health answers 200: loading, then
every resident size's sessions and CUDA graphs) and peak device memory (the GPU's memory in use, polled with
nvidia-smi while the server runs, and the server's own account).

--layouts (with --mixed --engine): the same seeded load against one server per flag set, in turn — e.g. on four GPUs
one replica, four one-GPU replicas and two two-GPU replicas:

    python benchmarks/load.py --engine DIR --mixed --concurrency 8 --requests 72 --steps 30 \
        --layouts "--backend ort-cuda --ray --replicas 1" "--backend ort-cuda --ray --replicas 4" \
                  "--backend ort-cuda --ray --replicas 2 --gpus-per-replica 2" --out RESULT.json
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
from sdxl_trt.runtime.profiles import BUCKETS


def gpu_name() -> str:
    from sdxl_trt.runtime import tensorrt_api

    gpu = tensorrt_api.gpu()
    return gpu.name if gpu else "CPU"

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


def start_server(engine: str, flags: str, log: str | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    output = open(log, "w") if log else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "sdxl_trt.runtime.cli", "serve", engine, "--port", str(port),
                                *shlex.split(flags)], stdout=output, stderr=subprocess.STDOUT if log else output)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
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
    raise SystemExit("load.py: the server did not become healthy in 600 s")


class DevicePoll:
    """The GPU's memory in use (MiB, nvidia-smi) polled every `every` seconds in a thread; `peak_gib` when stopped.
    Nothing where nvidia-smi is missing."""

    def __init__(self, every: float = 0.2):
        import shutil
        import threading

        self.peak, self.every = None, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if shutil.which("nvidia-smi") else None
        if self._thread:
            self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=10).stdout
                used = max(int(x) for x in text.split())
                self.peak = max(self.peak or 0, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(self.every)

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread:
            self._thread.join(15)
        return None if self.peak is None else round(self.peak / 1024, 2)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def server_memory(answer: dict) -> dict:
    """What a /health answer says of the device memory the server (one replica, under Ray) keeps: sessions per
    shape, GiB in use and at most, its budget and how many sessions it freed to keep it (ort-cuda; {} elsewhere)."""
    return {key: answer[key] for key in ("resident_sessions", "device_gib", "peak_device_gib", "budget_gib", "budget",
                                         "evictions") if key in answer}


def mixed(url: str, args) -> dict:
    """One request at a time over the sizes in a seeded random order, then each size's steady latency."""
    import random

    from sdxl_trt.runtime.validate import parse_sizes

    sizes = parse_sizes(args.sizes, "--sizes")
    rng = random.Random(args.seed)
    order = list(sizes) + [rng.choice(sizes) for _ in range(max(0, args.requests - len(sizes)))]
    rng.shuffle(order)

    def send(i: int, w: int, h: int) -> dict:
        body = {"prompt": f"a lighthouse at dawn, variation {i}", "size": f"{w}x{h}", "steps": args.steps,
                "seed": i}
        status, seconds, timings = post(url, body, args.timeout)
        return {"width": w, "height": h, "status": status, "latency_ms": round(seconds * 1e3, 1),
                "server_total_ms": round(timings.get("total", 0) * 1e3, 1)}

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:  # --concurrency clients over the seeded order
        requests = list(pool.map(lambda item: send(item[0], *item[1]), enumerate(order)))
    wall = time.perf_counter() - started
    steady = []
    for w, h in sizes:
        runs = [send(10_000 + len(steady) * 100 + k, w, h) for k in range(args.steady_runs)]
        steady.append({"width": w, "height": h, "latency_ms": statistics.median(r["latency_ms"] for r in runs),
                       "runs_ms": [r["latency_ms"] for r in runs]})
    by_size = {(s["width"], s["height"]): s["latency_ms"] for s in steady}
    for r in requests:
        r["vs_steady"] = round(r["latency_ms"] / by_size[(r["width"], r["height"])], 3)
    latencies = [r["latency_ms"] for r in requests if r["status"] == 200]
    ratios = [r["vs_steady"] for r in requests if r["status"] == 200]
    return {"requests": requests, "steady": steady, "concurrency": args.concurrency, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3),
            "latency_ms": {q: round(percentile(latencies, int(q[1:])), 1) for q in ("p50", "p95", "p99")}
            if latencies else None,
            "worst_vs_steady": max(ratios) if ratios else None,
            "within_1_15_of_steady": sum(x <= 1.15 for x in ratios), "errors": sum(r["status"] != 200 for r in requests)}


def compare_layouts(args) -> int:
    """The same seeded mixed load against one server per layout (started and stopped in turn). The JSON is written
    after each layout, so a run stopped part way keeps the layouts it finished."""
    layouts = []
    result = {"command": shlex.join(["python", *sys.argv]), "git": args.git,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": gpu_name(),
              "steps": args.steps, "mode": "mixed layouts", "seed": args.seed, "requests": args.requests,
              "concurrency": args.concurrency, "sizes": args.sizes, "layouts": layouts}
    for flags in args.layouts:
        poll, started = DevicePoll(), time.perf_counter()
        process, url = start_server(args.engine, flags, args.server_log)
        try:
            warmup_s = round(time.perf_counter() - started, 2)
            run = mixed(url, args)
            run["replica_memory"] = server_memory(health(url))
        finally:
            process.terminate()
            process.wait(60)
        layouts.append({"server_flags": flags, "warmup_s": warmup_s, "peak_device_gib": poll.stop(), **run})
        first = layouts[0]["requests_per_s"]
        layouts[-1]["throughput_vs_first"] = round(layouts[-1]["requests_per_s"] / first, 3) if first else None
        print(json.dumps({k: v for k, v in layouts[-1].items() if k not in ("requests", "steady")}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps([{k: l[k] for k in ("server_flags", "requests_per_s", "throughput_vs_first", "latency_ms")}
                      for l in layouts], indent=2))
    return 0 if not any(l["errors"] for l in layouts) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--engine", help="start `sdxl-trt serve ENGINE` for the run")
    where.add_argument("--url", help="a running server on this machine")
    p.add_argument("--server-flags", default="", help="extra flags for the server started with --engine")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, help="concurrent clients (default 8; 1 with --mixed)")
    p.add_argument("--size", default="128x128")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--mixed", action="store_true", help="requests over --sizes in a seeded random order from "
                   "--concurrency clients (1: one at a time), then each size's steady latency (see the module doc)")
    p.add_argument("--layouts", nargs="+", metavar="FLAGS", help="--mixed with --engine: one server per FLAGS (its "
                   "--server-flags, e.g. '--ray --replicas 1' '--ray --replicas 4' '--ray --replicas 2 "
                   "--gpus-per-replica 2'), started in turn, the same seeded load against each; layouts[] in one "
                   "JSON with each one's throughput against the first's")
    p.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in BUCKETS), help="--mixed: WxH,… (default: "
                   "the nine SDXL buckets)")
    p.add_argument("--steady-runs", type=int, default=3, help="--mixed: back-to-back requests per size for its "
                   "steady latency (the median)")
    p.add_argument("--seed", type=int, default=0, help="--mixed: the order's seed")
    p.add_argument("--server-log", help="write the server's output here")
    p.add_argument("--git", metavar="COMMIT", help="the commit measured, recorded in the JSON")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args()
    args.concurrency = args.concurrency or (1 if args.mixed else 8)
    if args.requests < 1 or args.concurrency < 1 or args.steady_runs < 1:
        raise SystemExit("load.py: --requests, --concurrency and --steady-runs must be at least 1")
    if args.layouts:
        if not (args.mixed and args.engine):
            raise SystemExit("load.py: --layouts goes with --mixed and --engine")
        return compare_layouts(args)
    process, poll, warmup_s = None, DevicePoll(), None
    if args.engine:
        started = time.perf_counter()
        process, url = start_server(args.engine, args.server_flags, args.server_log)
        warmup_s = round(time.perf_counter() - started, 2)
    else:
        url = args.url.rstrip("/")
        if urllib.parse.urlparse(url).hostname not in LOOPBACK:
            raise SystemExit(f"load.py: {url} is not on this machine; the load generator only talks to loopback")
    try:
        if args.mixed:
            ready = health(url)
            run = mixed(url, args)
            final = health(url)
            result = {"command": shlex.join(["python", *sys.argv]), "git": args.git,
                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": gpu_name(),
                      "server_flags": args.server_flags, "steps": args.steps, "mode": "mixed", "seed": args.seed,
                      "warmup_s": warmup_s, "server_warmup_s": ready.get("warmup_s"),
                      **{("server_" if key.endswith("gib") else "") + key: value
                         for key, value in server_memory(final).items()},
                      **run}
        else:
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
        peak = poll.stop()
    if args.mixed:
        result["peak_device_gib"] = peak  # nvidia-smi: the whole GPU, CUDA context included
        print(json.dumps({k: v for k, v in result.items() if k not in ("requests",)}, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0 if not result["errors"] else 1
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
