"""One `sdxl-trt` command (export, optimize, build) timed as a whole, with the peak resident memory of its largest
process (workers included) and, for an engine directory, what its manifest then records (the fusions `optimize`
made, the files' sizes): the figures README gives for full-size exports and optimizations come from its results.

    python benchmarks/command_run.py --out benchmarks/results/NAME.json [--dir DIR] -- sdxl-trt optimize DIR
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
import time
from datetime import datetime, timezone
from pathlib import Path


def manifest_figures(root: Path) -> dict:
    """Per component: the fusions of its optimized file and the bytes of each file the manifest lists."""
    manifest = json.loads((root / "manifest.json").read_text())
    out = {}
    for name, entry in manifest["components"].items():
        files = {}
        for record in [entry, *entry.get("optimized", {}).values()]:
            listed = record.get("files", [])  # an export's: {precision: [paths]}; an optimized file's: [paths]
            for path in [p for group in listed.values() for p in group] if isinstance(listed, dict) else listed:
                if (root / path).is_file():
                    files[path] = (root / path).stat().st_size
        out[name] = {"fused": {target: record.get("fused") for target, record in entry.get("optimized", {}).items()},
                     "files_gb": {path: round(size / 1e9, 3) for path, size in files.items()}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--dir", help="the engine directory the command writes: its manifest's records go in the results")
    p.add_argument("--git", metavar="COMMIT", help="the commit measured, where the tree has no .git")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --")
    from sdxl_trt.runtime import tensorrt_api
    from sdxl_trt.runtime.bench import git_state, versions

    gpu = tensorrt_api.gpu()
    started = time.perf_counter()
    run = subprocess.run(command)
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child's peak (Linux: KiB)
    result = {"command": shlex.join(["python", *sys.argv]), "measured": shlex.join(command),
              "git": {"commit": args.git, "dirty": False} if args.git else git_state(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": gpu.name if gpu else None},
              "versions": versions(), "exit": run.returncode, "wall_s": round(wall, 1),
              "peak_rss_gb": round(peak_kib * 1024 / 1e9, 2)}
    if args.dir and (Path(args.dir) / "manifest.json").is_file():
        result["components"] = manifest_figures(Path(args.dir))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("exit", "wall_s", "peak_rss_gb")}))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
