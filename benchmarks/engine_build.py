"""Engine build time, size and memory: export a model (in a child process), build its engines here, write JSON.

    python benchmarks/engine_build.py --model tiny:base --refiner tiny:refiner --backend tensorrt-rtx \
        --out benchmarks/results/engine-build-tiny-rtx-cpu.json
    python benchmarks/engine_build.py --model random:base --components unet --profiles 1024x1024 --max-batch 1 \
        --backend tensorrt-rtx --out benchmarks/results/engine-build-random-unet-rtx-cpu.json

Peak memory is this process's (the build only: the export runs in a child). The JSON records the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--refiner")
    p.add_argument("--components", nargs="+")
    p.add_argument("--backend", default="tensorrt-rtx", choices=["tensorrt", "tensorrt-rtx"])
    p.add_argument("--profiles")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--work", help="where to export (default: a temporary folder, removed)")
    args = p.parse_args()

    from sdxl_trt.runtime import tensorrt_api
    from sdxl_trt.runtime.engine_build import BuildOptions, build_engines
    from sdxl_trt.runtime.manifest import load_manifest
    from sdxl_trt.runtime.profiles import parse_profiles

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        engine_dir = Path(work) / "engine"
        export = [sys.executable, "-m", "sdxl_trt.runtime.cli", "export", "--model", args.model, "--out", str(engine_dir)]
        export += ["--refiner", args.refiner] if args.refiner else []
        export += ["--components", *args.components] if args.components else []
        t = time.perf_counter()
        subprocess.run(export, check=True, stdout=subprocess.DEVNULL)
        export_seconds = time.perf_counter() - t
        profiles = parse_profiles(args.profiles, None, args.max_batch, 4)
        t = time.perf_counter()
        report = build_engines(engine_dir, BuildOptions(args.backend, profiles), progress=False)
        build_seconds = time.perf_counter() - t
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        manifest = load_manifest(engine_dir)
        onnx = {(name, precision): sum(manifest.data["files"][f]["size"] for f in files)
                for name, entry in manifest.components.items() for precision, files in entry["files"].items()}
    device = tensorrt_api.gpu()
    result = {
        "what": f"{args.backend} engine build of {args.model}" + (f" + {args.refiner}" if args.refiner else ""),
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "gpu": None if device is None else device.name},
        "backend_version": tensorrt_api.version(args.backend),
        "profiles": [pr.label for pr in profiles],
        "export_seconds": round(export_seconds, 1),
        "build_seconds": round(build_seconds, 1),
        "build_peak_rss_gb": round(peak_gb, 2),
        "engines": [{"component": name, "precision": precision, "profiles": n, "engine_mb": round(size / 1e6, 1),
                     "onnx_mb": round(onnx[(name, precision)] / 1e6, 1), "seconds": seconds}
                    for name, precision, n, size, seconds, _ in report.rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
