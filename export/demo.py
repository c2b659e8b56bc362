"""`sdxl-trt demo`: the whole path that exists today, on the tiny model, on the CPU, ending in a PNG.

Today that is: model source (`tiny:base`) → our tokenizer (runtime/, no transformers) → CLIP-L ∥ CLIP-G
as the contracts define them (penultimate hidden states, projected pooled embedding) → diffusers' Euler
loop, UNet and VAE → PNG. The denoising loop and VAE move to sdxl-trt's own runtime when it lands.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..runtime import ClipTokenizer
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


def encode_prompt(model, prompts: list[str]):
    """Text conditioning of the SDXL contracts: ([B,77,768+1280] penultimate states of both encoders, [B,1280] pooled)."""
    import torch

    tokenizers = {name: ClipTokenizer.from_dir(path) for name, path in model.tokenizer_dirs.items()}
    states = []
    if model.clip_l is not None:
        ids = torch.from_numpy(tokenizers["tokenizer"](prompts).ids).long()
        states.append(model.clip_l(ids, output_hidden_states=True).hidden_states[-2])
    out = model.clip_g(torch.from_numpy(tokenizers["tokenizer_2"](prompts).ids).long(), output_hidden_states=True)
    states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), out.text_embeds


def run_demo(out: str | Path, *, prompt: str, steps: int = 20, seed: int = 0, size: str = "256x256") -> Path:
    import torch
    from PIL.PngImagePlugin import PngInfo

    from .reference import diffusers_pipeline
    from .sources import load_model

    path = _output_path(out)
    width, height = parse_size(size)
    positive_int(steps, "--steps")
    timings = {}
    t = time.perf_counter()
    model = load_model(MODEL)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    with torch.inference_mode():
        embeds, pooled = encode_prompt(model, [prompt])
    timings["text"] = time.perf_counter() - t

    t = time.perf_counter()
    pipe = diffusers_pipeline(model)
    with torch.inference_mode():
        # An empty negative prompt means zero negative conditioning for the SDXL base (force_zeros_for_empty_prompt).
        image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                     negative_prompt_embeds=torch.zeros_like(embeds),
                     negative_pooled_prompt_embeds=torch.zeros_like(pooled),
                     num_inference_steps=steps, width=width, height=height,
                     generator=torch.Generator().manual_seed(seed)).images[0]
    timings["denoise+vae"] = time.perf_counter() - t

    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nModel: {MODEL}, Steps: {steps}, Sampler: euler, CFG scale: 5.0, "
                                f"Seed: {seed}, Size: {width}x{height}, Pipeline: diffusers reference loop")
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    print("note: the denoising loop and VAE ran in the diffusers reference pipeline; sdxl-trt's own runtime "
          "takes over when it lands (issue 5)")
    return path
