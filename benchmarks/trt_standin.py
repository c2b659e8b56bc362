"""The `tensorrt` backend through the stand-in TensorRT module (tests/trt_standin) against `ort-cuda`, in one process
on one GPU (issue 23): both run the directory's optimized ONNX files on ONNX Runtime's kernels, so what differs is
the code of ours between them (engine checks, profile choice, bindings by tensor name, our CUDA graphs around each
enqueue or around the whole loop) and the stand-in's own cost.

    python benchmarks/trt_standin.py --engine DIR --out benchmarks/results/h100-tensorrt-standin.json \\
        [--size 1024x1024] [--steps 30] [--runs 5] [--git COMMIT]

Builds stand-in engines into DIR (`sdxl-trt build --backend tensorrt` through the stand-in: our builder, the
stand-in's builder API), then per CUDA-graph mode (step, loop) loads both backends, warms each up, and times
end-to-end calls (text encoders, 30 Euler steps at CFG 5, VAE decode to pixels) alternating between them; final
latents of the same seed are compared (rel-L2 against ort-cuda's).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["step", "loop"])
    p.add_argument("--git", help="the commit measured, where the tree has no .git")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "trt_standin"))
    import numpy as np

    import tensorrt  # the stand-in (tests/trt_standin)

    from sdxl_trt.runtime import Pipeline
    from sdxl_trt.runtime.bench import script_header
    from sdxl_trt.runtime.cuda import device_memory
    from sdxl_trt.runtime.engine_build import BuildOptions, build_engines
    from sdxl_trt.runtime.profiles import parse_profiles

    assert tensorrt.__version__.endswith("+standin"), tensorrt.__file__
    width, height = (int(v) for v in args.size.split("x"))
    started = time.perf_counter()
    build_engines(args.engine, BuildOptions("tensorrt", parse_profiles(f"{args.size},dynamic", None, 2, 4)),
                  progress=False)
    build_s = time.perf_counter() - started
    kw = dict(width=width, height=height, num_inference_steps=args.steps, guidance_scale=5.0, sampler="euler",
              seed=7, progress=False)
    cases = []
    for mode in args.modes:
        pipes = {"tensorrt": Pipeline.load(args.engine, backend="tensorrt", cuda_graphs=mode),
                 "ort-cuda": Pipeline.load(args.engine, backend="ort-cuda", cuda_graphs=mode)}
        latents, times = {}, {name: [] for name in pipes}
        for name, pipe in pipes.items():
            for _ in range(2):  # sessions, contexts, graphs captured
                pipe(PROMPT, output_type="np", **kw)
            latents[name] = pipe(PROMPT, output_type="latent", **kw).array
        before = {name: (graphs(pipe), device_memory()[0]) for name, pipe in pipes.items()}
        for _ in range(args.runs):
            for name, pipe in pipes.items():
                t = time.perf_counter()
                pipe(PROMPT, output_type="np", **kw)
                times[name].append((time.perf_counter() - t) * 1e3)
        reference = latents["ort-cuda"]
        for name in pipes:
            error = float(np.linalg.norm(latents[name] - reference) / np.linalg.norm(reference))
            cases.append({"backend": name, "cuda_graphs": mode, "e2e_ms": round(statistics.median(times[name]), 1),
                          "e2e_ms_runs": [round(t, 1) for t in times[name]], "rel_l2_vs_ort_cuda": error,
                          "last_run": pipes[name].backend.device_loop.last_run,
                          # after warm-up: no new capture, no device memory taken (all processes' use, timed runs)
                          "graphs_held": graphs(pipes[name]), "graphs_captured_in_timed_runs":
                              graphs(pipes[name]) - before[name][0],
                          "device_bytes_taken_in_timed_runs": device_memory()[0] - before[name][1]})
            print(json.dumps(cases[-1]), flush=True)
        for name in pipes:
            if hasattr(pipes[name].backend, "close"):
                pipes[name].backend.close()
        del pipes
        gc.collect()
    ratios = {}
    for mode in args.modes:
        row = {c["backend"]: c["e2e_ms"] for c in cases if c["cuda_graphs"] == mode}
        ratios[mode] = round(row["tensorrt"] / row["ort-cuda"], 3)
    out = {**script_header("the tensorrt backend through the stand-in TensorRT module (ONNX Runtime CUDA on the bound "
                           "addresses) against ort-cuda, same process, same optimized ONNX files", args.git),
           "case": {"size": args.size, "steps": args.steps, "guidance": 5.0, "sampler": "euler", "prompt": PROMPT,
                    "runs": args.runs}, "standin_build_s": round(build_s, 1), "cases": cases,
           "tensorrt_over_ort_cuda": ratios}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}: tensorrt / ort-cuda e2e {ratios}")
    return 0


def graphs(pipe) -> int:
    return pipe.backend.device_loop.graphs_held()


if __name__ == "__main__":
    sys.exit(main())
