"""`sdxl-trt generate`: command-line arguments → Pipeline call → PNG files with their parameters, or .npy latents."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_file, check_name, check_writable
from .images import load_image, write_png
from .metadata import control_record, file_sha256, generation_record, model_hash
from .validate import CLI_NAMES, parse_controls, parse_fractions, parse_size, positive_int, resident_options

log = logging.getLogger("sdxl_trt")


def read_prompts(args) -> list[str]:
    if args.prompts and args.prompt is not None:  # which one was meant cannot be guessed: neither is dropped silently
        raise UserError(f"give a PROMPT or --prompts FILE, not both (got {args.prompt!r} and --prompts "
                        f"{args.prompts!r})")
    if args.prompts:
        path = Path(args.prompts)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise UserError(f"--prompts {args.prompts!r}: no such file") from None
        except OSError as e:
            raise UserError(f"--prompts {args.prompts!r}: cannot read it ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"--prompts {args.prompts!r} is not UTF-8 text (byte {e.start})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--prompts {args.prompts!r} holds no prompt")
        return prompts
    if args.prompt is None:
        raise UserError("give a PROMPT or --prompts FILE")
    return [args.prompt]


def seeds_line(seeds: list[int]) -> str:
    """The random seeds a run used, said whatever the output's name, so that the run can be repeated."""
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    return f"{which} (random; --seed {seeds[0]} repeats it)"


def output_room(paths: list[Path], width: int, height: int, latent: bool) -> None:
    """Enough free space for the results, known once the size is: latents are [1, 4, h/8, w/8] float32; a PNG is
    at most about its raw RGB bytes (deflate does not grow noise by more than a few per mille)."""
    each = 4 * (height // 8) * (width // 8) * 4 + 128 if latent else width * height * 3 + 16 * 1024
    check_writable(paths[0], f"--out {str(paths[0])!r}", each * len(paths))


def keep_inputs(outputs: list[Path], inputs: dict[str, str | None]) -> None:
    """No output is one of the files the run reads (an --init-image written over by its own result is lost)."""
    written = {path.expanduser().resolve(): path for path in outputs}
    for flag, value in inputs.items():
        read = Path(value).expanduser().resolve() if value else None
        if read in written:
            raise UserError(f"--out {str(written[read])!r} would write over {flag.split()[0]} {value!r}; write the "
                            "result elsewhere")


def output_paths(out: str | None, first_seed: int, n: int, suffix: str) -> list[Path]:
    base = Path(out).expanduser() if out else Path(f"sdxl-trt-{first_seed}{suffix}")
    check_name(base, f"--out {str(base)!r}")
    if base.is_dir():
        raise UserError(f"--out {str(base)!r} is a folder; give a file name such as {base / ('image' + suffix)}")
    if base.suffix.lower() != suffix:
        raise UserError(f"--out {str(base)!r}: expected a {suffix} file name")
    if not base.parent.is_dir():
        raise UserError(f"--out {str(base)!r}: folder {base.parent} does not exist")
    paths = [base] if n == 1 else [base.with_name(f"{base.stem}-{i + 1}{base.suffix}") for i in range(n)]
    for number, path in enumerate(paths[1:], start=2):
        check_name(path, f"--out {str(base)!r}")
        if path.is_dir():
            raise UserError(f"--out {str(base)!r}: {path} (the name of image {number} of the batch) is a folder")
    return paths


# --from-png: the record's keys (metadata.generation_record) → generate's arguments
FROM_PNG = {"prompt": "prompt", "negative_prompt": "negative", "seed": "seed", "steps": "steps", "sampler": "sampler",
            "spacing": "spacing", "guidance": "guidance", "guidance_rescale": "guidance_rescale", "size": "size",
            "long_prompt": "long_prompt", "refiner_start": "refiner_start", "refine_strength": "refine_strength",
            "init_image": "init_image", "strength": "strength", "mask": "mask"}
# arguments that make one choice together: typing one of them keeps the file's values for all of them out
TOGETHER = ({"prompt", "prompts"}, {"refiner_start", "refine_strength"})


def apply_png(args) -> dict:
    """`--from-png FILE`: the arguments not typed on the command line taken from FILE's record (the same
    parameters and seed give the same image); returns the record."""
    from .cli import typed_options
    from .metadata import read_record

    record = read_record(args.from_png)
    typed = typed_options(args.argv) if hasattr(args, "argv") else set()
    for names in TOGETHER:
        typed |= names if typed & names else set()
    for key, dest in FROM_PNG.items():
        if dest not in typed:
            setattr(args, dest, record.get(key))  # absent: a feature that was not used (its default is None)
    for key, flag in (("init_image", "--init-image"), ("mask", "--mask")):
        digest = record.get(f"{key}_sha256")
        if digest is None or key in typed:
            continue
        if getattr(args, key) is None:
            raise UserError(f"--from-png {args.from_png!r}: its {flag[2:]} came in an HTTP request; give it with "
                            f"{flag} PNG")
        path = Path(getattr(args, key))
        if path.is_file() and file_sha256(path.read_bytes()) != digest:
            raise UserError(f"--from-png {args.from_png!r}: {flag} {str(path)!r} has changed since the image was "
                            f"made; give {flag} {path} to use it as it is now")
    controls = record.get("controls") or []
    if controls and not typed & {"control", "control_start", "control_end", "guess_mode"}:
        if not all(isinstance(c, dict) and isinstance(c.get("scale"), (int, float)) for c in controls):
            raise UserError(f"--from-png {args.from_png!r}: its record's 'controls' is not a list of control images")
        for k, c in enumerate(controls):
            if "path" not in c:
                raise UserError(f"--from-png {args.from_png!r}: its control image {k + 1} came in an HTTP request; "
                                "give the control images with --control PNG[:SCALE]")
            path = Path(c["path"])
            if path.is_file() and file_sha256(path.read_bytes()) != c.get("sha256"):
                raise UserError(f"--from-png {args.from_png!r}: --control {str(path)!r} has changed since the image "
                                f"was made; give --control {path} to use it as it is now")
        args.control = [f"{c['path']}:{c['scale']!r}" for c in controls]
        args.control_start = ",".join(repr(float(c.get("start", 0.0))) for c in controls)
        args.control_end = ",".join(repr(float(c.get("end", 1.0))) for c in controls)
        args.guess_mode = bool(record.get("guess_mode", False))
    if "lora" not in typed:
        loras = record.get("loras") or []
        if not isinstance(loras, list) or not all(isinstance(a, dict) and ("file" in a and isinstance(
                a.get("scale"), (int, float)) or "name" in a) for a in loras):
            raise UserError(f"--from-png {args.from_png!r}: its record's 'loras' is not a list of adapters")
        served = [a["name"] for a in loras if "file" not in a]
        if served:
            raise UserError(f"--from-png {args.from_png!r}: made with the server's LoRA adapter {served[0]!r}; give "
                            "each adapter with --lora PATH:SCALE")
        args.lora = [f"{a['file']}:{a['scale']!r}" for a in loras] or None
    return record


def image_source(path: str | None) -> dict | None:
    """What the record keeps of an input image file: its path as given and its sha256."""
    return None if path is None else {"path": path, "sha256": file_sha256(Path(path).read_bytes())}


def generate(args) -> list[Path]:
    record = apply_png(args) if getattr(args, "from_png", None) else None
    if args.strength is not None and args.init_image is None:
        raise UserError("--strength goes with --init-image")
    if args.mask is not None and args.init_image is None:
        raise UserError("--mask goes with --init-image (the image it masks)")
    prompts = read_prompts(args)
    positive_int(args.steps, "--steps")
    positive_int(args.batch, "--batch")
    width, height = parse_size(args.size) if args.size else (None, None)
    resident = resident_options(args.backend, args.buckets, args.max_device_memory, args.devices)
    latents = None
    if args.latents:
        try:
            latents = np.load(args.latents, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise UserError(f"--latents {args.latents!r}: not a readable .npy array ({e or 'empty file'})") from None
    suffix = ".npy" if args.output_type == "latent" else ".png"
    # a bad or unwritable --out (or working folder, for the default name) fails before any work
    planned = output_paths(args.out, 0, len(prompts) * args.batch, suffix)  # names with the seed are known later
    check_writable(planned[0], f"--out {str(planned[0])!r}" if args.out else "the working folder (no --out)")
    control_paths, control_scales = parse_controls(getattr(args, "control", None))
    if args.out:
        keep_inputs(planned, {"--init-image": args.init_image, "--mask": args.mask, "--latents": args.latents,
                              "--prompts": args.prompts, "--from-png": getattr(args, "from_png", None),
                              **{f"--control {p}": p for p in control_paths}})
    image = load_image(args.init_image) if args.init_image else None
    mask = load_image(args.mask, "--mask", mode="L") if args.mask else None
    controls = [load_image(path, "--control") for path in control_paths]
    control = dict(control_image=controls or None, controlnet_conditioning_scale=control_scales or None,
                   control_guidance_start=parse_fractions(getattr(args, "control_start", None), "--control-start"),
                   control_guidance_end=parse_fractions(getattr(args, "control_end", None), "--control-end"),
                   guess_mode=getattr(args, "guess_mode", False))
    if len(controls) == 1:  # one net: the values, not lists of one
        control["control_image"], control["controlnet_conditioning_scale"] = controls[0], control_scales[0]
    from .lora import as_adapters
    from .manifest import work_for
    from .pipeline import Pipeline

    as_adapters(args.lora, CLI_NAMES)  # --lora scales checked, in the CLI's words, before anything loads
    work = work_for(decode=args.output_type != "latent", img2img=image is not None,  # its components checked at load
                    refiner=args.refiner_start is not None or args.refine_strength is not None)
    pipe = Pipeline.load(args.dir, backend=args.backend, cuda_graphs=args.cuda_graphs, low_memory=args.low_memory,
                         loras=args.lora, work=work, **resident)
    w, h = pipe.call_size(width, height, image, controls or None)
    if image is None and args.long_prompt == "truncate":  # the shapes the call runs at are known: make them now,
        # in the background while the prompts are encoded
        pipe.prepare(w, h, len(prompts) * args.batch, guidance=args.guidance is None or args.guidance > 1,
                     refiner=args.refiner_start is not None, wait=False, control=bool(controls),
                     guess_mode=control["guess_mode"])
    if record is not None and record["model_hash"] != model_hash(pipe, pipe.main_role):
        log.warning("--from-png %s was made with other weights (model hash %s; %s has %s): the image will differ",
                    args.from_png, record["model_hash"], args.dir, model_hash(pipe, pipe.main_role))
    output_room(planned, w, h, args.output_type == "latent")
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
                sampler=args.sampler, spacing=args.spacing, strength=args.strength, refiner_start=args.refiner_start,
                refine_strength=args.refine_strength, long_prompt=args.long_prompt)
    result = pipe(prompts, args.negative or None, height=height, width=width, num_images_per_prompt=args.batch,
                  seed=args.seed, latents=latents, image=image, mask_image=mask,
                  output_type="latent" if args.output_type == "latent" else "pil", names=CLI_NAMES, **call, **control)
    paths = output_paths(args.out, result.seeds[0], len(result.seeds), suffix)
    if args.seed is None:
        print(seeds_line(result.seeds))
    if args.output_type == "latent":
        for path, latent in zip(paths, result.array):
            with atomic_file(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, latent[None])
    else:
        h, w = result.array.shape[1:3]
        prompts_per_image = [p for p in prompts for _ in range(args.batch)]
        inputs = {"init_image": image_source(args.init_image), "mask": image_source(args.mask),
                  "controls": control_record([image_source(path) for path in control_paths], control_scales,
                                             control["control_guidance_start"], control["control_guidance_end"]),
                  "guess_mode": control["guess_mode"]}
        loras = [{"file": str(a.path), "scale": a.scale} for a in pipe.loras]
        for path, image, seed, prompt in zip(paths, result.images, result.seeds, prompts_per_image):
            write_png(path, image, generation_record(pipe, call, prompt=prompt, negative=args.negative, seed=seed,
                                                     size=(w, h), backend=args.backend, loras=loras, **inputs))
    if args.timings:
        print("load: " + ", ".join(f"{k} {v:.2f} s" for k, v in pipe.load_timings.items()))
        print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    return paths
