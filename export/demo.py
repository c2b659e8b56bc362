"""`sdxl-trt demo`: the whole path that exists today, on the tiny model, on the CPU, ending in a PNG.

Today that is: model source (`tiny:base`) → ONNX export of both text encoders into an engine directory →
our tokenizer (runtime/, no transformers) → clip_l ∥ clip_g on ONNX Runtime (penultimate hidden states and
projected pooled embedding, as the contracts define them) → diffusers' Euler loop, UNet and VAE → PNG.
The denoising loop and VAE move to sdxl-trt's own runtime when it lands (issue 5).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..runtime import ClipTokenizer
from ..runtime.errors import UserError
from ..runtime.fileio import atomic_file
from ..runtime.manifest import load_manifest
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


def encode_prompt_onnx(engine_dir: Path, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """SDXL text conditioning from an engine directory: ([B,77,clip_l+clip_g] context, [B,pooled])."""
    import onnxruntime as ort

    manifest = load_manifest(engine_dir)
    states, pooled = [], None
    for name, tokenizer in (("clip_l", "tokenizer"), ("clip_g", "tokenizer_2")):
        ids = ClipTokenizer.from_dir(engine_dir / tokenizer)(prompts).ids
        path = manifest.path(manifest.components[name]["precisions"]["fp32"])
        outputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
        states.append(outputs[0])
        if name == "clip_g":
            pooled = outputs[1]
    return np.concatenate(states, axis=-1), pooled


def run_demo(out: str | Path, *, prompt: str, steps: int = 20, seed: int = 0, size: str = "256x256") -> Path:
    import torch
    from PIL.PngImagePlugin import PngInfo

    from .engine_dir import export_engine_dir
    from .reference import diffusers_pipeline
    from .sources import load_model

    path = _output_path(out)
    width, height = parse_size(size)
    positive_int(steps, "--steps")
    timings = {}
    with tempfile.TemporaryDirectory(prefix="sdxl-trt-demo-") as tmp:
        t = time.perf_counter()
        engine = Path(tmp) / "engine"
        export_engine_dir(MODEL, engine, components=["clip_l", "clip_g"], precision="fp32", progress=False)
        timings["export text encoders"] = time.perf_counter() - t
        t = time.perf_counter()
        embeds, pooled = encode_prompt_onnx(engine, [prompt])
        timings["text (ONNX Runtime)"] = time.perf_counter() - t

    t = time.perf_counter()
    pipe = diffusers_pipeline(load_model(MODEL, progress=False))
    embeds, pooled = torch.from_numpy(embeds), torch.from_numpy(pooled)
    with torch.inference_mode():
        # An empty negative prompt means zero negative conditioning for the SDXL base (force_zeros_for_empty_prompt).
        image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                     negative_prompt_embeds=torch.zeros_like(embeds),
                     negative_pooled_prompt_embeds=torch.zeros_like(pooled),
                     num_inference_steps=steps, width=width, height=height,
                     generator=torch.Generator().manual_seed(seed)).images[0]
    timings["denoise + VAE (diffusers)"] = time.perf_counter() - t

    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nModel: {MODEL}, Steps: {steps}, Sampler: euler, CFG scale: 5.0, "
                                f"Seed: {seed}, Size: {width}x{height}, Pipeline: ONNX text encoders + diffusers loop")
    with atomic_file(path) as tmp_png:
        image.save(tmp_png, format="PNG", pnginfo=info)
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    print("note: the denoising loop and VAE ran in the diffusers reference pipeline; sdxl-trt's own runtime "
          "takes over when it lands (issue 5)")
    return path
