"""`sdxl-trt generate`: command-line arguments → Pipeline call → PNG files with their parameters, or .npy latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_file
from .images import load_image, write_png
from .validate import parse_size, positive_int, resident_options


def read_prompts(args) -> list[str]:
    if args.prompts:
        path = Path(args.prompts)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise UserError(f"--prompts {args.prompts!r}: no such file") from None
        except UnicodeDecodeError as e:
            raise UserError(f"--prompts {args.prompts!r} is not UTF-8 text (byte {e.start})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--prompts {args.prompts!r} holds no prompt")
        return prompts
    if args.prompt is None:
        raise UserError("give a PROMPT or --prompts FILE")
    return [args.prompt]


def output_paths(out: str | None, first_seed: int, n: int, suffix: str) -> list[Path]:
    base = Path(out).expanduser() if out else Path(f"sdxl-trt-{first_seed}{suffix}")
    if base.is_dir():
        raise UserError(f"--out {str(base)!r} is a folder; give a file name such as {base / ('image' + suffix)}")
    if base.suffix.lower() != suffix:
        raise UserError(f"--out {str(base)!r}: expected a {suffix} file name")
    if not base.parent.is_dir():
        raise UserError(f"--out {str(base)!r}: folder {base.parent} does not exist")
    if n == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i + 1}{base.suffix}") for i in range(n)]


def generate(args) -> list[Path]:
    if args.strength is not None and args.init_image is None:
        raise UserError("--strength goes with --init-image")
    if args.mask is not None and args.init_image is None:
        raise UserError("--mask goes with --init-image (the image it masks)")
    prompts = read_prompts(args)
    positive_int(args.steps, "--steps")
    positive_int(args.batch, "--batch")
    width, height = parse_size(args.size) if args.size else (None, None)
    resident = resident_options(args.backend, args.buckets, args.max_device_memory)
    latents = None
    if args.latents:
        try:
            latents = np.load(args.latents, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--latents {args.latents!r}: not a readable .npy array ({e})") from None
    suffix = ".npy" if args.output_type == "latent" else ".png"
    if args.out:  # a bad --out fails before any work
        output_paths(args.out, 0, len(prompts) * args.batch, suffix)
    image = load_image(args.init_image) if args.init_image else None
    mask = load_image(args.mask, "--mask", mode="L") if args.mask else None
    from .pipeline import Pipeline

    pipe = Pipeline.load(args.dir, backend=args.backend, cuda_graphs=args.cuda_graphs, low_memory=args.low_memory,
                         loras=args.lora, **resident)
    if image is None and args.long_prompt == "truncate":  # the shapes the call runs at are known: make them now,
        # in the background while the prompts are encoded
        pipe.prepare(width, height, len(prompts) * args.batch, guidance=args.guidance is None or args.guidance > 1,
                     refiner=args.refiner_start is not None, wait=False)
    result = pipe(prompts, args.negative or None, height=height, width=width, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale, sampler=args.sampler,
                  spacing=args.spacing, num_images_per_prompt=args.batch, seed=args.seed, latents=latents,
                  image=image, mask_image=mask, strength=args.strength,
                  refiner_start=args.refiner_start, refine_strength=args.refine_strength, long_prompt=args.long_prompt,
                  output_type="latent" if args.output_type == "latent" else "pil")
    paths = output_paths(args.out, result.seeds[0], len(result.seeds), suffix)
    if args.output_type == "latent":
        for path, latent in zip(paths, result.array):
            with atomic_file(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, latent[None])
    else:
        h, w = result.array.shape[1:3]
        prompts_per_image = [p for p in prompts for _ in range(args.batch)]
        for path, image, seed, prompt in zip(paths, result.images, result.seeds, prompts_per_image):
            write_png(path, image, {
                "prompt": prompt, "negative_prompt": args.negative, "seed": seed, "steps": args.steps,
                "sampler": args.sampler, "guidance": args.guidance, "size": f"{w}x{h}",
                "refiner_start": args.refiner_start, "refine_strength": args.refine_strength,
                "init_image": args.init_image, "mask": args.mask, "strength": args.strength if args.init_image else None,
                "backend": args.backend, "model": pipe.manifest.data["sources"],
                "loras": [{"file": str(a.path), "scale": a.scale} for a in pipe.loras] or None,
                "manifest_sha256": pipe.manifest.sha256})
    if args.timings:
        print("load: " + ", ".join(f"{k} {v:.2f} s" for k, v in pipe.load_timings.items()))
        print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    return paths
