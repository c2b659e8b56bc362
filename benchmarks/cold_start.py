"""Engine directory → first image in a fresh process (issue 20), measured in parts on the GPU in one command:

    python benchmarks/cold_start.py --engine DIR --out benchmarks/results/h100-cold-start.json \\
        [--baseline-path OLD --baseline-label COMMIT]   # OLD: a folder holding sdxl_trt/ of the code to compare with

  start      fresh interpreters: `python -c pass`, `import onnxruntime`, `import sdxl_trt.runtime.cli` (median of 3).
  upload     each component's GPU file's weights read into device memory in a fresh process (the page cache filled
             by a first read): this code's staging-buffer upload with each way of reading and thread count, and with
             --baseline-path the earlier code's upload; GiB/s.
  sessions   the UNet's 1024² session (weights loaded) made at each ONNX Runtime optimization level: seconds to make,
             first run, steady run, and the largest difference of its output from the default level's.
  first_call in one process: load, prepare, then the first 1024² call and a second one, each stage's seconds.
  one_shot   `sdxl-trt generate DIR "a red fox" --backend ort-cuda --timings` in fresh processes, in turn with this
             code in each upload order (ort_cuda.PREPARE_ORDER) and the baseline code: wall time and the parts printed; one more
             run of each of this code's variants with --verbose records when each weight upload, session, warm run
             and stage finished (seconds since the process was started).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

PROMPT = "a red fox"


def env_with(pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return env


def child(code: str, *args: str, pythonpath: str | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one line `RESULT {json}`."""
    run = subprocess.run([sys.executable, "-c", code, *args], env=env_with(pythonpath), capture_output=True, text=True)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"exit": run.returncode, "error": (run.stderr.strip().splitlines() or ["?"])[-1][:400]}
    return json.loads(line[len("RESULT "):])


def start_times() -> dict:
    out = {}
    for label, code in (("python", "pass"), ("import onnxruntime", "import onnxruntime"),
                        ("import sdxl_trt.runtime.cli", "import sdxl_trt.runtime.cli")):
        walls = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            walls.append(time.perf_counter() - started)
        out[label] = round(statistics.median(walls), 3)
    print(json.dumps({"start_s": out}), flush=True)
    return out


UPLOAD = r"""
import json, sys, time
from pathlib import Path
from sdxl_trt.runtime import cuda
from sdxl_trt.runtime.manifest import load_manifest
from sdxl_trt.runtime.weights import SharedWeights
engine, read, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
if read != "baseline":
    cuda.UPLOAD_READ, cuda.UPLOAD_WORKERS = read, workers
m = load_manifest(engine)
cuda.Stream()  # the CUDA context, not timed
out = {}
for name, entry in m.components.items():
    path = m.path(entry["optimized"]["cuda"]["path"])
    for f in entry["optimized"]["cuda"]["files"]:
        with open(m.path(f), "rb") as fh:  # the page cache filled, as for a one-shot with the cache warm
            while fh.read(1 << 26):
                pass
    started = time.perf_counter()
    w = SharedWeights(path, 0, nhwc=True)
    seconds = time.perf_counter() - started
    out[name] = {"gib": round(w.nbytes / 2**30, 3), "s": round(seconds, 3), "gib_per_s": round(w.nbytes / 2**30 / seconds, 2)}
    w.free()
print("RESULT " + json.dumps(out))
"""


def uploads(engine: str, baseline: str | None) -> list:
    out = []
    variants = [("mmap", 4), ("pread", 4), ("mmap", 8), ("pread", 8), ("mmap", 1)]
    for read, workers in variants:
        out.append({"code": "this", "read": read, "workers": workers, **child(UPLOAD, engine, read, str(workers))})
        print(json.dumps(out[-1]), flush=True)
    if baseline:
        out.append({"code": "baseline", **child(UPLOAD, engine, "baseline", "0", pythonpath=baseline)})
        print(json.dumps(out[-1]), flush=True)
    return out


SESSIONS = r"""
import json, sys, time
import numpy as np
from sdxl_trt.runtime import backends
from sdxl_trt.runtime.pipeline import Pipeline
engine, levels = sys.argv[1], sys.argv[2].split(",")
pipe = Pipeline.load(engine, backend="ort-cuda")
be = pipe.backend
rng = np.random.default_rng(0)
feeds = dict(sample=rng.standard_normal((2, 4, 128, 128)).astype(np.float16),
             timestep=np.full(2, 500.0, np.float32),
             encoder_hidden_states=rng.standard_normal((2, 77, 2048)).astype(np.float16),
             text_embeds=rng.standard_normal((2, 1280)).astype(np.float16),
             time_ids=np.array([[1024, 1024, 0, 0, 1024, 1024]] * 2, np.float32))
weights = be._shared("unet", None)
out, reference = {}, None
for level in levels:
    backends.SHARED_OPTIMIZATION = level
    started = time.perf_counter()
    session = be._make("unet", dims={"B": 2, "S": 77, "h": 128, "w": 128})
    made = time.perf_counter() - started
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        result = session.run(**feeds)["noise_pred"].astype(np.float32)
        runs.append(time.perf_counter() - started)
    if reference is None:
        reference = result
    out[level] = {"make_s": round(made, 3), "first_run_s": round(runs[0], 3), "steady_run_ms": round(min(runs[2:]) * 1e3, 1),
                  "max_abs_diff": float(np.abs(result - reference).max())}
    del session
print("RESULT " + json.dumps(out))
"""

FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
from sdxl_trt.runtime.pipeline import Pipeline
imported = time.perf_counter() - t0
engine, graphs = sys.argv[1], sys.argv[2]
pipe = Pipeline.load(engine, backend="ort-cuda", cuda_graphs=graphs)
pipe.prepare(1024, 1024)
out = {"cuda_graphs": graphs, "import_s": round(imported, 3), "load": {k: round(v, 3) for k, v in pipe.load_timings.items()}}
for call in ("first", "second"):
    started = time.perf_counter()
    r = pipe("a red fox", num_inference_steps=30, seed=0, progress=False)
    out[call] = {"total_s": round(time.perf_counter() - started, 3), **{k: round(v, 3) for k, v in r.timings.items()}}
print("RESULT " + json.dumps(out))
"""


RUN_CLI = "import sys\nfrom sdxl_trt.runtime.cli import main\nsys.exit(main())\n"


def one_shot(engine: str, pythonpath: str | None, label: str, extra: list[str], verbose: bool = False,
             prelude: str = "") -> dict:
    """One fresh `sdxl-trt generate` process (as `python -c`, so that `prelude` may set a module constant first)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["generate", engine, PROMPT, "--backend", "ort-cuda", "--seed", "0", "--timings", *extra,
                *(["--verbose"] if verbose else [])]
        command = [sys.executable, "-c", prelude + RUN_CLI, *args, "--out", str(Path(tmp) / "fox.png")]
        launched = time.time()
        started = time.perf_counter()
        run = subprocess.run(command, env=env_with(pythonpath), capture_output=True, text=True)
        wall = time.perf_counter() - started
    parts = {}
    for line in run.stdout.splitlines():
        for key, value in re.findall(r"([a-z][a-z ]*?) ([0-9.]+) s", line.split(":", 1)[-1]):
            parts[key.strip()] = float(value)
    out = {"code": label, "wall_s": round(wall, 2), "exit": run.returncode, "parts_s": parts,
           "command": shlex.join(["sdxl-trt", *args, "--out", "fox.png"])}
    if prelude:
        out["prelude"] = prelude.strip()
    if verbose:  # our log's lines, each with the seconds since the process was started
        out["log"] = []
        for line in run.stderr.splitlines():
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (sdxl_trt[.\w]*): (.*)", line)
            if stamp:
                at = datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - launched
                out["log"].append(f"+{at:.3f} s {stamp[2]}: {stamp[3][:160]}")
    else:
        out["stderr_lines"] = len([x for x in run.stderr.splitlines() if x.strip()])
    if run.returncode != 0:
        out["error"] = (run.stderr.strip().splitlines() or ["?"])[-1][:300]
    print(json.dumps(out), flush=True)
    return out


def parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the benchmarks that compare this code with an earlier copy on one engine directory."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--baseline-path", help="PYTHONPATH entry holding the earlier sdxl_trt to compare with")
    p.add_argument("--baseline-label", default="baseline")
    p.add_argument("--git", metavar="COMMIT", help="the commit measured, where the tree has no .git")
    return p


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--runs", type=int, default=3, help="one-shot runs of each variant")
    p.add_argument("--parts", nargs="+", default=["start", "upload", "sessions", "first_call", "one_shot"],
                   choices=["start", "upload", "sessions", "first_call", "one_shot"])
    p.add_argument("--levels", default="ORT_ENABLE_EXTENDED,ORT_ENABLE_BASIC,ORT_DISABLE_ALL")
    args = p.parse_args()
    from sdxl_trt.runtime import tensorrt_api
    from sdxl_trt.runtime.bench import git_state, versions

    gpu = tensorrt_api.gpu()
    result = {"device": gpu.name if gpu else "CPU", "command": shlex.join(["python", *sys.argv]),
              "git": {"commit": args.git, "dirty": False} if args.git else git_state(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
              "engine": args.engine, "prompt": PROMPT, "baseline": args.baseline_label}
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(result, indent=2) + "\n")

    if "start" in args.parts:
        result["start_s"] = start_times()
        save()
    if "upload" in args.parts:
        result["upload"] = uploads(args.engine, args.baseline_path)
        save()
    if "sessions" in args.parts:
        result["sessions"] = child(SESSIONS, args.engine, args.levels)
        print(json.dumps({"sessions": result["sessions"]}), flush=True)
        save()
    if "first_call" in args.parts:
        result["first_call"] = [child(FIRST_CALL, args.engine, graphs) for graphs in ("step", "off")]
        print(json.dumps({"first_call": result["first_call"]}), flush=True)
        save()
    if "one_shot" in args.parts:
        order = "import sdxl_trt.runtime.ort_cuda as o\no.PREPARE_ORDER = {!r}\n"
        variants = [("this", None, [], ""),
                    ("this, text encoders' weights first", None, [], order.format("stage")),
                    ("this, largest file first", None, [], order.format("size"))]
        if args.baseline_path:
            variants.append((args.baseline_label, args.baseline_path, [], ""))
        # one run first, not counted: a fresh export's files are hashed once (then recorded by file identity), and
        # the figure is "with the cache filled"
        result["one_shot_unmeasured"] = one_shot(args.engine, None, "this (fills the hash record)", [])
        result["one_shot"] = []
        for _ in range(args.runs):
            for label, path, extra, prelude in variants:
                result["one_shot"].append(one_shot(args.engine, path, label, extra, prelude=prelude))
                save()
        result["one_shot_median_s"] = {label: statistics.median(r["wall_s"] for r in result["one_shot"]
                                                                if r["code"] == label and r["exit"] == 0)
                                       for label, *_ in variants
                                       if any(r["code"] == label and r["exit"] == 0 for r in result["one_shot"])}
        result["one_shot_timelines"] = [one_shot(args.engine, None, label, extra, verbose=True, prelude=prelude)
                                        for label, path, extra, prelude in variants[:3]]
        save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
