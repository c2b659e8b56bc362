"""ControlNet at full size on the GPU (issue 25): `ort-cuda` with one ControlNet against the same process without it,
and parity with diffusers' fp16 StableDiffusionXLControlNetPipeline on the same weights.

    sdxl-trt export --model random:base --controlnet random:controlnet --precision fp32 --out DIR
    sdxl-trt optimize DIR
    python benchmarks/controlnet.py --engine DIR --out benchmarks/results/h100-controlnet.json [--runs 5] [--git C]

Cases (1024², 30 Euler steps, CFG 5, batch 1): without ControlNet, with one (scale 0.8), with one in guess mode,
with one for the first half of the steps (`control_guidance_end` 0.5: the net is not run at the others);
timed in alternation after two warm-up calls each (sessions made, CUDA graphs captured); end-to-end medians
(prompt → PIL image) and the ratio with / without (issue 25's bound: ≤ 1.35). Parity: final latents against
diffusers fp16 (random:base + random:controlnet built by the exporter's own code, moved to the GPU in fp16) from the
same initial noise and control image (bound 3e-2), and how far the latents move when the control image changes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "a photograph of an astronaut riding a horse"
SIZE, STEPS, GUIDANCE = 1024, 30, 5.0


def control_image(shift: int = 0):
    """An edge-map-like control image: white outlines on black."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for k in range(6):
        box = (80 + 120 * k + shift, 100 + 60 * k, 400 + 100 * k + shift, 500 + 70 * k)
        draw.rectangle(box, outline=(255, 255, 255), width=6)
    draw.ellipse((300 + shift, 300, 800 + shift, 900), outline=(255, 255, 255), width=8)
    return image


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--git", help="the commit measured, where the tree has no .git")
    p.add_argument("--no-parity", action="store_true", help="skip the diffusers comparison (no torch needed)")
    args = p.parse_args()
    from sdxl_trt.runtime import Pipeline
    from sdxl_trt.runtime.bench import script_header

    pipe = Pipeline.load(args.engine, backend="ort-cuda", buckets=[(SIZE, SIZE)])
    image = control_image()
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, sampler="euler", seed=7,
              progress=False)
    cases = {"without": {}, "one ControlNet": dict(control_image=image, controlnet_conditioning_scale=0.8),
             "guess mode": dict(control_image=image, controlnet_conditioning_scale=0.8, guess_mode=True),
             "window 0-0.5": dict(control_image=image, controlnet_conditioning_scale=0.8, control_guidance_end=0.5)}
    for extra in cases.values():
        for _ in range(2):
            pipe(PROMPT, **kw, **extra)
    times, modes = {name: [] for name in cases}, {}
    for _ in range(args.runs):
        for name, extra in cases.items():
            started = time.perf_counter()
            pipe(PROMPT, **kw, **extra)
            times[name].append((time.perf_counter() - started) * 1e3)
            modes[name] = pipe.backend.device_loop.last_run
    medians = {name: round(statistics.median(t), 1) for name, t in times.items()}
    rows = {"e2e_ms": medians, "e2e_ms_runs": {n: [round(v, 1) for v in t] for n, t in times.items()},
            "ratio_vs_without": {n: round(medians[n] / medians["without"], 3) for n in cases},
            "device_loop": modes}
    print(json.dumps({k: v for k, v in rows.items() if k != "e2e_ms_runs"}), flush=True)
    parity = None
    if not args.no_parity:
        parity = compare_with_diffusers(pipe, image)
        print(json.dumps(parity), flush=True)
    out = {**script_header("one ControlNet (random:controlnet) against none, same process; parity with diffusers' "
                           "fp16 StableDiffusionXLControlNetPipeline", args.git),
           "prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "steps": STEPS, "guidance": GUIDANCE, "runs": args.runs,
           "timing": rows, "parity": parity}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


def compare_with_diffusers(pipe, image) -> dict:
    import torch
    from diffusers import StableDiffusionXLControlNetPipeline

    from sdxl_trt.export.controlnet_sources import load_controlnet, resolve_controlnet
    from sdxl_trt.export.reference import diffusers_pipeline
    from sdxl_trt.export.sources import load_model

    model = load_model("random:base", progress=False)
    config = dict(model.unet.config)
    net = load_controlnet(resolve_controlnet("random:controlnet"), 0, config)
    reference = StableDiffusionXLControlNetPipeline.from_pipe(diffusers_pipeline(model), controlnet=net)
    reference = reference.to("cuda", torch.float16)
    noise = np.random.default_rng(0).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    with torch.no_grad():
        theirs = reference(PROMPT, image=image, controlnet_conditioning_scale=0.8, output_type="latent",
                           latents=torch.from_numpy(noise).to("cuda", torch.float16), **kw).images.float().cpu().numpy()
    ours = pipe(PROMPT, latents=noise, control_image=image, controlnet_conditioning_scale=0.8, sampler="euler",
                output_type="latent", progress=False, **kw).array
    moved = pipe(PROMPT, latents=noise, control_image=control_image(shift=200), controlnet_conditioning_scale=0.8,
                 sampler="euler", output_type="latent", progress=False, **kw).array
    plain = pipe(PROMPT, latents=noise, sampler="euler", output_type="latent", progress=False, **kw).array
    return {"latents_rel_l2_vs_diffusers_fp16": rel_l2(ours, theirs), "bound": 3e-2,
            "control_image_shifted_rel_l2": rel_l2(moved, ours), "without_controlnet_rel_l2": rel_l2(plain, ours)}


if __name__ == "__main__":
    sys.exit(main())
