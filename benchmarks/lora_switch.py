"""What switching LoRA adapters costs, against re-exporting the model (issue: LoRA without re-export).

    python benchmarks/lora_switch.py --engine DIR --out RESULT.json [--backend ort-cuda] [--rank 64]
        [--size 1024x1024] [--steps 4] [--reexport tiny:base]

Writes a random rank-R adapter (diffusers/PEFT names, every attention and feed-forward projection of the base UNet's
transformer blocks, shapes read from the engine directory) and times, in one process:
  call          a warm call with the adapter set unchanged (the baseline)
  apply         set_loras(adapter) + the next call, less `call`: reading the file, merging, new sessions
                (apply_merge: the part spent reading and merging weights)
  to_base       set_loras(None) + the next call, less `call` (no merging: the exported weights)
  back          set_loras(adapter) again + the next call, less `call` (the merged weights are cached)
and whether the switch did anything: the rel-L2 of the adapter's final latents against the base's (`adapter_effect`:
an adapter that is silently ignored reads 0) and of the base's after switching back against the first
(`back_to_base`: ~0).
and, with --reexport SRC, `sdxl-trt export` of that source to a temporary folder (what a switch costs without this).
With --merge-only, only the reading and merging of the adapter into the UNet file (no sessions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def write_adapter(engine: Path, rank: int, path: Path) -> int:
    """A random rank-`rank` PEFT-named adapter for every transformer projection of the base UNet; returns layers."""
    from safetensors.numpy import save_file

    from sdxl_trt.runtime.lora import Weights
    from sdxl_trt.runtime.manifest import load_manifest

    manifest = load_manifest(engine)
    weights = Weights(manifest.path(next(iter(manifest.components["unet"]["precisions"].values()))), "unet")
    rng = np.random.default_rng(0)
    tensors = {}
    for module, name in weights.modules.items():
        if "transformer_blocks" not in module or not module.endswith(MODULES):
            continue
        shape = weights.shape(name)
        out, inp = (shape[1], shape[0]) if name.endswith(".weight.T") else shape[:2]
        tensors[f"unet.{module}.lora_A.weight"] = (rng.standard_normal((rank, inp)) / np.sqrt(inp)).astype(np.float16)
        tensors[f"unet.{module}.lora_B.weight"] = (rng.standard_normal((out, rank)) * 0.01).astype(np.float16)
    save_file(tensors, str(path))
    return len(tensors) // 2


def merge_only(args) -> None:
    """--merge-only: Adapters.set + Adapters.overrides for the base UNet's session file, --runs times (each from a
    fresh Adapters: nothing cached), without making a session."""
    from sdxl_trt.runtime.backends import context_file, session_file
    from sdxl_trt.runtime.bench import versions
    from sdxl_trt.runtime.lora import Adapters, as_adapters
    from sdxl_trt.runtime.manifest import load_manifest

    engine = Path(args.engine)
    manifest = load_manifest(engine)
    entry = manifest.components["unet"]
    kind, precision, relative = session_file(entry, None if args.backend == "ort-cuda" else "fp32")
    path = manifest.path(relative or entry["precisions"][precision])
    context = manifest.path(context_file(entry)) if kind == "cuda" and context_file(entry) else None  # its K/V part
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / f"random-rank{args.rank}.safetensors"
        layers = write_adapter(engine, args.rank, adapter)
        runs = []
        for _ in range(args.runs):
            adapters = Adapters()
            started = time.perf_counter()
            adapters.set(as_adapters([adapter]), manifest)
            merged = dict(adapters.overrides("unet", path, others=(context,) if context else ()))
            if context:
                merged.update(adapters.overrides("unet", context, others=(path,)))
            runs.append({"set_and_merge_s": time.perf_counter() - started, "merge_s": adapters.merge_s})
        result = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "machine": platform.node(),
                  "cpus": os.cpu_count(), "versions": versions(), "engine": str(engine), "file": str(path),
                  "file_kind": kind, "model": manifest.data.get("sources", {}), "rank": args.rank, "layers": layers,
                  "merged_gb": round(sum(a.nbytes for a in merged.values()) / 1e9, 2), "runs": runs,
                  "median": {k: round(float(np.median([r[k] for r in runs])), 2) for k in runs[0]}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"]), result["merged_gb"], "GB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--size", default=None, help="WxH (default: the model's)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--reexport", metavar="SRC", help="also time `sdxl-trt export --model SRC` (needs torch)")
    p.add_argument("--merge-only", action="store_true", help="time only reading and merging the adapter into the "
                   "UNet file the backend would load (no sessions: e.g. a full-size UNet on a CPU)")
    args = p.parse_args()
    if args.merge_only:
        return merge_only(args)

    from sdxl_trt.runtime import Pipeline
    from sdxl_trt.runtime.bench import versions
    from sdxl_trt.runtime.validate import parse_size

    engine = Path(args.engine)
    pipe = Pipeline.load(engine, backend=args.backend)
    side = pipe.manifest.data["model"]["default_size"]
    width, height = parse_size(args.size) if args.size else (side, side)
    sync = pipe.backend.stream.synchronize if hasattr(pipe.backend, "stream") else (lambda: None)

    latents = {}

    def call(key: str = "last") -> float:
        started = time.perf_counter()
        latents[key] = pipe("a lighthouse on a cliff", height=height, width=width, num_inference_steps=args.steps,
                            seed=0, output_type="latent", progress=False).array.astype(np.float64)
        sync()
        return time.perf_counter() - started

    def rel_l2(a: str, b: str) -> float:
        return float(np.linalg.norm(latents[a] - latents[b]) / np.linalg.norm(latents[b]))

    def switched(loras) -> float:
        started = time.perf_counter()
        pipe.set_loras(loras)
        return time.perf_counter() - started + call()

    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / f"random-rank{args.rank}.safetensors"
        layers = write_adapter(engine, args.rank, adapter)
        call("base")  # warm: sessions, kernels
        rows = []
        for _ in range(args.runs):
            base = float(np.median([call() for _ in range(2)]))
            merged_before = pipe.backend.adapters.merge_s
            apply = switched([adapter])
            merge = pipe.backend.adapters.merge_s - merged_before
            steady = float(np.median([call() for _ in range(2)]))
            effect = rel_l2("last", "base")
            to_base = switched(None)
            restored = rel_l2("last", "base")
            back = switched([adapter])
            pipe.set_loras(None)
            pipe.backend.adapters._merged.clear()  # the next run merges again
            call()  # the base's sessions made again before the next baseline
            rows.append({"call_s": base, "call_with_adapter_s": steady, "apply_s": apply - steady, "apply_merge_s": merge,
                         "to_base_s": to_base - base, "back_s": back - steady, "adapter_effect_rel_l2": effect,
                         "back_to_base_rel_l2": restored})
        result = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "machine": platform.node(),
                  "versions": versions(), "backend": args.backend, "engine": str(engine),
                  "model": pipe.manifest.data.get("sources", {}), "size": f"{width}x{height}", "steps": args.steps,
                  "rank": args.rank, "layers": layers, "adapter_mb": round(adapter.stat().st_size / 1e6, 1),
                  "runs": rows, "median": {k: round(float(np.median([r[k] for r in rows])), 4) for k in rows[0]}}
        if args.reexport:
            from sdxl_trt.export.engine_dir import export_engine_dir

            started = time.perf_counter()
            export_engine_dir(args.reexport, Path(tmp) / "reexport", progress=False)
            result["reexport_s"] = round(time.perf_counter() - started, 2)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"]), result.get("reexport_s"))


if __name__ == "__main__":
    main()
