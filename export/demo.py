"""`sdxl-trt demo`: the whole path on the tiny model, on the CPU, ending in a PNG.

tiny:base (torch) → ONNX export of every component into a temporary engine directory → sdxl-trt's runtime
(tokenizers, clip_l ∥ clip_g, Euler loop with classifier-free guidance, VAE decode on ONNX Runtime CPU, no
torch) → PNG with its parameters in a text chunk.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ..runtime.errors import UserError
from ..runtime.fileio import atomic_file
from ..runtime.validate import parse_size, positive_int

MODEL = "tiny:base"


def _output_path(out: str | Path) -> Path:
    path = Path(out).expanduser()
    if path.is_dir():
        raise UserError(f"--out {str(out)!r} is a folder; give a file name such as {path / 'demo.png'}")
    if path.suffix.lower() != ".png":
        raise UserError(f"--out {str(out)!r}: the demo writes PNG, so the name must end in .png")
    if not path.parent.is_dir():
        raise UserError(f"--out {str(out)!r}: folder {path.parent} does not exist")
    return path


def run_demo(out: str | Path, *, prompt: str, steps: int = 20, seed: int = 0, size: str = "256x256") -> Path:
    from PIL.PngImagePlugin import PngInfo

    from ..runtime.pipeline import Pipeline
    from .engine_dir import export_engine_dir

    path = _output_path(out)
    width, height = parse_size(size)
    positive_int(steps, "--steps")
    with tempfile.TemporaryDirectory(prefix="sdxl-trt-demo-") as tmp:
        t = time.perf_counter()
        engine = Path(tmp) / "engine"
        export_engine_dir(MODEL, engine, precision="fp32")
        exported = time.perf_counter() - t
        pipe = Pipeline.load(engine)
        result = pipe(prompt, height=height, width=width, num_inference_steps=steps, seed=seed)
    info = PngInfo()
    info.add_text("parameters", json.dumps({"prompt": prompt, "seed": seed, "steps": steps, "sampler": "euler",
                                            "guidance": 5.0, "size": f"{width}x{height}", "model": MODEL}))
    with atomic_file(path) as tmp_png:
        result.images[0].save(tmp_png, format="PNG", pnginfo=info)
    timings = {"export": exported, **result.timings}
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return path
