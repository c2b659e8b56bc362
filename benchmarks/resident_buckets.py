"""Every SDXL bucket at full speed from the first request (issue 20), measured on the GPU in one command:

    python benchmarks/resident_buckets.py --engine DIR --out benchmarks/results/h100-resident-buckets.json \\
        [--baseline-path OLD]   # OLD: a folder holding sdxl_trt/ of the code to compare with (e.g. git archive b977cb6)

  sequence   for cuDNN's convolution search EXHAUSTIVE and HEURISTIC in turn, a fresh pipeline through the sizes of
             the issue's table (1024², 1152×896, 1024², 896×1152, 1152×896, 1024², 1024²; 30 Euler steps, CFG 5,
             prompt → PIL image), then 5 steady calls at 1024² and 3 at 1152×896: each call's ms, the steady medians,
             device memory, the sessions kept and what each measured; with --baseline-path the earlier code through
             the same sequence in a child process (its default settings) — the same GPU, directory and run.
  one_shot   `sdxl-trt generate DIR PROMPT --backend ort-cuda --timings` in fresh processes with the cache filled:
             wall time and the parts the command prints; with --baseline-path the earlier code's command too.
The mixed-size serving run is benchmarks/load.py --mixed.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SEQUENCE = [(1024, 1024), (1152, 896), (1024, 1024), (896, 1152), (1152, 896), (1024, 1024), (1024, 1024)]
PROMPT = "a photograph of an astronaut riding a horse"
STEPS = 30

CHILD = r"""
import gc, json, statistics, sys, time
from sdxl_trt.runtime import Pipeline
engine, search, sequence = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
kw = {}
pipe = Pipeline.load(engine, backend="ort-cuda")
if search != "default":
    pipe.backend.conv_search = search
from sdxl_trt.runtime.bench import device_used_gib
def call(w, h):
    t = time.perf_counter()
    pipe(%r, width=w, height=h, num_inference_steps=%d, seed=0, progress=False)
    return (time.perf_counter() - t) * 1e3
out = {"search": search, "sequence_ms": [round(call(w, h), 1) for w, h in sequence]}
out["steady_1024_ms"] = [round(call(1024, 1024), 1) for _ in range(5)]
out["steady_1152x896_ms"] = [round(call(1152, 896), 1) for _ in range(3)]
out["device_gib"] = round(device_used_gib(), 2)
resident = getattr(pipe.backend, "resident", None)
if resident is not None:
    out["resident"] = {" ".join(map(str, k)): None if v is None else round(v / 2**30, 3) for k, v in resident.sizes().items()}
    out["weights_gib"] = {k[0].parent.name: round(w.nbytes / 2**30, 3) for k, w in pipe.backend._weights.items()}
print("RESULT " + json.dumps(out), flush=True)
""" % (PROMPT, STEPS)


def child(engine: str, search: str, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", CHILD, engine, search, json.dumps(SEQUENCE)], env=env,
                         capture_output=True, text=True)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"search": search, "exit": run.returncode, "error": (run.stderr.strip().splitlines() or ["?"])[-1][:300]}
    out = {**json.loads(line[len("RESULT "):]), "exit": run.returncode}
    out["steady_1024_median_ms"] = statistics.median(out["steady_1024_ms"])
    out["steady_1152x896_median_ms"] = statistics.median(out["steady_1152x896_ms"])
    out["process_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out), flush=True)
    return out


def one_shot(engine: str, pythonpath: str | None, label: str) -> dict:
    from cold_start import one_shot as run  # benchmarks/cold_start.py: the same command, more variants

    return run(engine, pythonpath, label, [])


def main() -> int:
    from cold_start import parser

    p = parser(__doc__)
    p.add_argument("--one-shots", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=["sequence", "one_shot"], choices=["sequence", "one_shot"])
    args = p.parse_args()
    from sdxl_trt.runtime import tensorrt_api
    from sdxl_trt.runtime.bench import git_state, versions

    gpu = tensorrt_api.gpu()
    result = {"device": gpu.name if gpu else "CPU", "command": shlex.join(["python", *sys.argv]),
              "git": {"commit": args.git, "dirty": False} if args.git else git_state(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "engine": args.engine, "prompt": PROMPT, "steps": STEPS, "guidance": 5.0,
              "sequence_sizes": [f"{w}x{h}" for w, h in SEQUENCE], "baseline": args.baseline_label}
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(result, indent=2) + "\n")

    if "sequence" in args.parts:
        result["sequence"] = [child(args.engine, search, None) for search in ("EXHAUSTIVE", "HEURISTIC")]
        save()
        if args.baseline_path:
            result["baseline_sequence"] = child(args.engine, "default", args.baseline_path)
            save()
    if "one_shot" in args.parts:
        result["one_shot"] = [one_shot(args.engine, None, "this") for _ in range(args.one_shots)]
        save()
        if args.baseline_path:
            result["baseline_one_shot"] = [one_shot(args.engine, args.baseline_path, args.baseline_label)
                                           for _ in range(2)]
            save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
