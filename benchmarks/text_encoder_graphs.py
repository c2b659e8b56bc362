"""What running the text encoders as CUDA graphs buys on ort-cuda (device_loop.encode): one pipeline, in one process,
with `Pipeline.graph_text_encoders` off and on, in alternating rounds (off, on, off, on, …) so that drift on the
machine hits both alike.

    python benchmarks/text_encoder_graphs.py --engine DIR --out RESULT.json [--runs 10] [--git COMMIT]

Cases: 512² 4 Euler steps without guidance (the batch-1 path of distilled models: issue 8's ≤ 60 ms goal) and 1024²
30 steps with CFG 5 (the headline case). Per case and mode: median and p90 of prompt → PIL image, and of the text
stage (the pipeline's own timings: tokenizing, both encoders, the copies back).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from sdxl_trt.runtime.bench import PROMPT, Timer, git_state, stats_ms, versions

CASES = ({"width": 512, "height": 512, "num_inference_steps": 4, "guidance_scale": 1.0},
         {"width": 1024, "height": 1024, "num_inference_steps": 30, "guidance_scale": 5.0})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=10, help="timed calls per case and mode (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two modes (default 2)")
    p.add_argument("--git", metavar="COMMIT", help="the commit measured, where the tree has no .git")
    args = p.parse_args()

    from sdxl_trt.runtime import Pipeline
    from sdxl_trt.runtime.tensorrt_api import gpu

    pipe = Pipeline.load(args.engine, backend="ort-cuda")
    timer = Timer(-(-args.runs // args.rounds), 2, pipe.backend.stream.synchronize)
    result = {"device": gpu().name, "command": shlex.join(["python", *sys.argv]),
              "git": {"commit": args.git, "dirty": False} if args.git else git_state(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
              "engine": args.engine, "prompt": PROMPT, "cases": []}
    for case in CASES:
        samples = {False: ([], []), True: ([], [])}
        for _ in range(args.rounds):
            for graphs in (False, True):
                pipe.graph_text_encoders = graphs
                e2e, results = timer(lambda case=case: pipe(PROMPT, seed=0, progress=False, **case))
                samples[graphs][0].extend(e2e)
                samples[graphs][1].extend(r.timings["text"] for r in results)
        row = {**case}
        for graphs, (e2e, text) in samples.items():
            mode = "graphs" if graphs else "plain"
            row[mode] = {"e2e_ms": stats_ms(e2e), "text_ms": stats_ms(text), "runs": len(e2e)}
        row["saved_ms"] = round(row["plain"]["e2e_ms"]["median"] - row["graphs"]["e2e_ms"]["median"], 2)
        result["cases"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
