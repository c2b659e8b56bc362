"""`sdxl-trt demo`: the whole path on the tiny model, on the CPU, ending in a PNG.

tiny:base (torch) → ONNX export of every component into a temporary engine directory → sdxl-trt's runtime
(tokenizers, clip_l ∥ clip_g, Euler loop with classifier-free guidance, VAE decode on ONNX Runtime CPU, no
torch) → PNG with its parameters in a text chunk.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..runtime.fileio import check_writable
from ..runtime.generate import output_paths
from ..runtime.images import write_png
from ..runtime.metadata import generation_record
from ..runtime.validate import parse_size, positive_int

MODEL = "tiny:base"


def run_demo(out: str | Path, *, prompt: str, steps: int = 20, seed: int = 0, size: str = "256x256") -> Path:
    from ..runtime.pipeline import MAX_SEED, Pipeline, checked_seed
    from .engine_dir import export_engine_dir

    path = output_paths(str(out), seed, 1, ".png")[0]
    width, height = parse_size(size)
    check_writable(path, f"--out {str(path)!r}", width * height * 3 + 16 * 1024)  # about its raw bytes at most
    positive_int(steps, "--steps")
    checked_seed(seed, MAX_SEED, "--seed")  # before the export, not after it
    with tempfile.TemporaryDirectory(prefix="sdxl-trt-demo-") as tmp:
        t = time.perf_counter()
        engine = Path(tmp) / "engine"
        export_engine_dir(MODEL, engine, precision="fp32")
        exported = time.perf_counter() - t
        pipe = Pipeline.load(engine)
        result = pipe(prompt, height=height, width=width, num_inference_steps=steps, seed=seed)
    call = {"num_inference_steps": steps, "sampler": "euler"}
    write_png(path, result.images[0], generation_record(pipe, call, prompt=prompt, negative=None, seed=seed,
                                                        size=(width, height), backend="ort-cpu", loras=[]))
    timings = {"export": exported, **result.timings}
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return path
