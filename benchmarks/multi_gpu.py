"""One image on two GPUs (guidance halves in parallel, runtime/parallel_loop.py) against the same process on one GPU
(issue 24): `ort-cuda` with `devices=(0,)` and `devices=(0, 1)` loaded side by side, timed in alternation.

    python benchmarks/multi_gpu.py --engine DIR --out benchmarks/results/h100x2-guidance-parallel.json \\
        [--runs 5] [--steps 30] [--git COMMIT]

Cases: 1024x1024 and 1152x896 (30 Euler steps, CFG 5, batch 1, the base alone), 1024x1024 with the refiner as the
second expert from 0.8 (when the directory has one), and a batch of 2 (the images split across the GPUs). Per case:
end-to-end medians (prompt → PIL image, as `sdxl-trt bench` times it), the speed-up, the final latents' rel-L2 of
two GPUs against one (same seed), and the time the first GPU spends copying the other half in each step (CUDA events
around the peer copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--git", help="the commit measured, where the tree has no .git")
    args = p.parse_args()
    import numpy as np

    from sdxl_trt.runtime import Pipeline
    from sdxl_trt.runtime.bench import script_header

    sizes = [(1024, 1024), (1152, 896)]
    pipes = {"1 GPU": Pipeline.load(args.engine, backend="ort-cuda", devices=(0,), buckets=sizes),
             "2 GPUs": Pipeline.load(args.engine, backend="ort-cuda", devices=(0, 1), buckets=sizes)}
    cases = [dict(width=w, height=h) for w, h in sizes]
    if pipes["1 GPU"].has_refiner:
        cases.append(dict(width=1024, height=1024, refiner_start=0.8))
    cases.append(dict(width=1024, height=1024, num_images_per_prompt=2))
    rows = []
    for case in cases:
        kw = dict(num_inference_steps=args.steps, guidance_scale=5.0, sampler="euler", seed=7, progress=False, **case)
        latents = {}
        for name, pipe in pipes.items():
            for _ in range(2):  # sessions made, CUDA graphs captured
                pipe(PROMPT, **kw)
            latents[name] = pipe(PROMPT, output_type="latent", **kw).array
        times = {name: [] for name in pipes}
        exchange = []
        for _ in range(args.runs):
            for name, pipe in pipes.items():
                started = time.perf_counter()
                pipe(PROMPT, **kw)
                times[name].append((time.perf_counter() - started) * 1e3)
                if name == "2 GPUs":
                    exchange += pipe.backend.device_loop.last_exchange_ms
        one, two = latents["1 GPU"], latents["2 GPUs"]
        row = {**case, "steps": args.steps, "guidance": 5.0, "sampler": "euler",
               "split": pipes["2 GPUs"].backend.device_loop.last_split.kind,
               "e2e_ms": {name: round(statistics.median(t), 1) for name, t in times.items()},
               "e2e_ms_runs": {name: [round(v, 1) for v in t] for name, t in times.items()},
               "speedup": round(statistics.median(times["1 GPU"]) / statistics.median(times["2 GPUs"]), 3),
               "rel_l2_2_vs_1_gpu": float(np.linalg.norm(two - one) / np.linalg.norm(one)),
               "exchange_ms_per_step": {"median": round(statistics.median(exchange), 4),
                                        "max": round(max(exchange), 4)} if exchange else None,
               "devices": {name: list(pipe.backend.devices) for name, pipe in pipes.items()}}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "e2e_ms_runs"}), flush=True)
    out = {**script_header("one image's guidance halves on two GPUs (and a batch split across them) against one "
                           "GPU, same process, same engine directory, alternating runs", args.git),
           "peer_access": {f"{a}->{b}": v for (a, b), v in pipes["2 GPUs"].backend.device_loop.direct.items()},
           "prompt": PROMPT, "runs": args.runs, "cases": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
