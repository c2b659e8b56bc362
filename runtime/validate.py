"""Checks on what users type, shared by the CLI and the Python API: each failure is a one-line UserError."""

from __future__ import annotations

import math
import numbers
import re

import numpy as np

from .errors import UserError

# SDXL's VAE maps 8×8 pixels to one latent: image sides must be multiples of 8.
VAE_FACTOR = 8
MAX_PIXELS = 4096 * 4096  # per image: 16 times SDXL's native area; beyond it one image needs tens of GB
MAX_IMAGES = 16  # per call (prompts × batch)

# Ranges outside which a number is a mistake, not a setting. Guidance: SDXL's default is 5, diffusers users go up to
# about 30 (A1111's slider ends there); 100 leaves a wide margin for experiments, while far beyond it the guided
# prediction is the text-minus-unconditional difference blown up and the image collapses to a few saturated colours
# (guidance 1e30 gave a two-colour image). Values ≤ 1 turn guidance off, as in diffusers, so negative ones mean nothing.
GUIDANCE_RANGE = (0.0, 100.0)
# guidance_rescale blends the rescaled and the plain prediction (Lin et al. 2023 use 0.7): outside [0, 1] it extrapolates.
GUIDANCE_RESCALE_RANGE = (0.0, 1.0)
# LoRA scales: 0–1.5 for most adapters, negative and larger ones for "slider" adapters (UIs offer about ±5 to ±8);
# ±20 is beyond any published use, while a scale like 1e38 only pushes the merged weights out of fp32's range.
LORA_SCALE_RANGE = (-20.0, 20.0)
# ControlNet conditioning scales: 0–2 in use (diffusers' examples 0.5–1); the same margin as LoRA's, beyond which the
# residuals only overflow fp16 (1e38 gave NaN latents blamed on the model)
CONTROL_SCALE_RANGE = (-20.0, 20.0)

# How each front door spells an argument in its errors. Checks take the Python API's argument name (the API's own
# spelling) and a `names` map from it to the caller's: the CLI's flags here; the HTTP server maps to its request fields.
CLI_NAMES = {
    "prompt": "PROMPT", "negative_prompt": "--negative", "height": "--size", "width": "--size",
    "num_inference_steps": "--steps", "guidance_scale": "--guidance", "guidance_rescale": "--guidance-rescale",
    "sampler": "--sampler", "spacing": "--spacing", "num_images_per_prompt": "--batch", "seed": "--seed",
    "latents": "--latents", "image": "--init-image", "mask_image": "--mask", "strength": "--strength",
    "refiner_start": "--refiner-start", "refine_strength": "--refine-strength", "long_prompt": "--long-prompt",
    "output_type": "--output-type", "loras": "--lora", "low_memory": "--low-memory", "buckets": "--buckets",
    "max_device_memory": "--max-device-memory", "backend": "--backend", "generator": "--seed",
    "control_image": "--control", "controlnet_conditioning_scale": "--control IMAGE:SCALE",
    "control_guidance_start": "--control-start", "control_guidance_end": "--control-end", "guess_mode": "--guess-mode",
}


def spelled(name: str, names: dict | None = None) -> str:
    """An argument's name as the caller spells it (the API's own name when `names` has none for it)."""
    return (names or {}).get(name, name)


def as_number(value):
    """A Python or numpy real number (a numpy scalar or 0-d array too, as numpy code hands them over) as a Python int
    or float; None for anything else, booleans included (True is not a step count)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'WxH' → (width, height), both positive multiples of 8."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"{flag} {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024")
    w, h = int(m.group(1)), int(m.group(2))
    check_size(w, h, f"{flag} {text!r}")
    return w, h


def parse_sizes(text: str, flag: str) -> list[tuple[int, int]]:
    """'WxH,WxH,…' → [(width, height), …], each as parse_size checks it; at least one."""
    sizes = [parse_size(part, flag) for part in str(text).split(",") if part.strip()]
    if not sizes:
        raise UserError(f"{flag} {text!r}: expected comma-separated WIDTHxHEIGHT sizes, e.g. 1024x1024,1216x832")
    return sizes


def resident_options(backend: str, buckets=None, max_device_memory=None, devices=None) -> dict:
    """Pipeline.load's `buckets` ("WxH,…", or a list of "WxH" / (W, H)), `max_device_memory` (GiB) and `devices`
    ("0,1" or a list of GPU ids) checked and normalised: {"buckets": [(W, H), …] or None, "max_device_memory": float
    or None, "devices": (ids…) or None}. The CLI calls it before anything loads; load_backend again for the Python
    API. Whether each GPU id exists is checked when the backend starts (ort_cuda.check_devices)."""
    if (buckets is not None or max_device_memory is not None) and backend != "ort-cuda":
        raise UserError(f"--buckets and --max-device-memory choose what --backend ort-cuda keeps on the GPU; "
                        f"{backend} takes neither")
    devices = parse_devices(devices)
    if devices is not None and backend == "ort-cpu":
        raise UserError(f"--devices {','.join(map(str, devices))}: --backend ort-cpu runs on the CPU; GPUs are for "
                        f"--backend ort-cuda")
    if devices is not None and devices != (0,) and backend != "ort-cuda":
        raise UserError(f"--devices {','.join(map(str, devices))}: {backend} runs on GPU 0; another GPU, or "
                        f"several, are for --backend ort-cuda")
    gib = as_number(max_device_memory)
    if max_device_memory is not None and (gib is None or not math.isfinite(gib) or gib <= 0):
        raise UserError(f"--max-device-memory {shown(max_device_memory)}: expected a positive number of GiB")
    if isinstance(buckets, str):
        buckets = parse_sizes(buckets, "--buckets")
    elif buckets is not None:
        sizes = []
        for size in buckets:
            if isinstance(size, str):
                sizes.append(parse_size(size, "--buckets"))
            elif (isinstance(size, (tuple, list)) and len(size) == 2 and
                  all(isinstance(as_number(v), int) for v in size)):
                size = tuple(as_number(v) for v in size)
                check_size(*size, f"--buckets {size[0]}x{size[1]}")
                sizes.append(size)
            else:
                raise UserError(f"--buckets {size!r}: expected WIDTHxHEIGHT or (width, height)")
        buckets = sizes
    return {"buckets": buckets, "max_device_memory": None if max_device_memory is None else float(gib),
            "devices": devices}


def parse_devices(devices) -> tuple[int, ...] | None:
    """`--devices`: "0,1" (or a list of ids) → (0, 1); each a non-negative integer, none twice."""
    if devices is None:
        return None
    if isinstance(devices, str):
        items = devices.split(",") if devices.strip() else []
    else:
        items = list(devices)
    if not items:
        raise UserError("--devices: no GPU id given; e.g. --devices 0 or --devices 0,1")
    given = devices if isinstance(devices, str) else ",".join(map(str, items))
    out = []
    for item in items:
        value = (int(item.strip()) if item.strip().isdigit() else None) if isinstance(item, str) else as_number(item)
        if not isinstance(value, int) or value < 0:
            raise UserError(f"--devices {given}: {item!r} is not a GPU id (0, 1, …)")
        if value in out:
            raise UserError(f"--devices {given}: GPU {value} is given twice")
        out.append(value)
    return tuple(out)


def check_size(width: int, height: int, what: str | None = None) -> None:
    what = what or f"size {width}x{height}"
    if width <= 0 or height <= 0 or width % VAE_FACTOR or height % VAE_FACTOR:
        raise UserError(f"{what}: width and height must be positive multiples of {VAE_FACTOR}")
    if width * height > MAX_PIXELS:
        raise UserError(f"{what}: larger than the {MAX_PIXELS // 2**20} megapixels this runtime accepts per image "
                        "(SDXL is trained at about 1 megapixel)")


def finite(value: float, flag: str, low: float | None = None, high: float | None = None,
           names: dict | None = None) -> float:
    """A finite number (Python or numpy), within [low, high] where given, as a Python float; `flag` is the argument's
    API name, spelled through `names` in the error."""
    number = as_number(value)
    flag = spelled(flag, names)
    if number is None or not math.isfinite(number):
        raise UserError(f"{flag} {shown(value)}: expected a finite number")
    if (low is not None and number < low) or (high is not None and number > high):
        span = f"between {low:g} and {high:g}" if low is not None and high is not None else \
            f"at least {low:g}" if low is not None else f"at most {high:g}"
        raise UserError(f"{flag} {shown(value)}: expected a number {span}")
    return float(number)


def whole(value: int, flag: str, least: int = 1, names: dict | None = None) -> int:
    """A whole number (Python or numpy) ≥ `least`, as a Python int."""
    number = as_number(value)
    if not isinstance(number, int) or number < least:
        raise UserError(f"{spelled(flag, names)} {shown(value)}: expected a whole number ≥ {least}")
    return number


def positive_int(value: int, flag: str, names: dict | None = None) -> int:
    return whole(value, flag, 1, names)


def shown(value) -> str:
    """A value as an error message quotes it: numpy scalars as the number they hold (1e+30, not np.float64(1e+30))."""
    number = as_number(value)
    return repr(value) if number is None or type(value) in (int, float) else repr(number)


def parse_controls(values: list[str] | None) -> tuple[list[str], list[float]]:
    """`--control IMAGE[:SCALE]` values → (image paths, scales); a suffix that is not a number stays in the path."""
    paths, scales = [], []
    for value in values or []:
        path, sep, tail = value.rpartition(":")
        try:
            scale = float(tail) if sep and path else None
        except ValueError:
            scale = None
        if scale is None:
            path, scale = value, 1.0
        elif not math.isfinite(scale):
            raise UserError(f"--control {value!r}: the scale must be a finite number")
        paths.append(path)
        scales.append(scale)
    return paths, scales


def parse_fractions(value: str | None, flag: str) -> list[float] | None:
    """`--control-start 0,0.3` → [0.0, 0.3] (checked later, against the ControlNets: validate.finite)."""
    if value is None:
        return None
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected fractions like 0.2 or 0,0.3 (one per ControlNet)") from None
