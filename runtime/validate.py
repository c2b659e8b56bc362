"""Checks on what users type, shared by the CLI and the Python API: each failure is a one-line UserError."""

from __future__ import annotations

import math
import re

from .errors import UserError

# SDXL's VAE maps 8×8 pixels to one latent: image sides must be multiples of 8.
VAE_FACTOR = 8
MAX_PIXELS = 4096 * 4096  # per image: 16 times SDXL's native area; beyond it one image needs tens of GB
MAX_IMAGES = 16  # per call (prompts × batch)


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


def resident_options(backend: str, buckets=None, max_device_memory=None) -> dict:
    """Pipeline.load's `buckets` ("WxH,…", or a list of "WxH" / (W, H)) and `max_device_memory` (GiB) checked and
    normalised: {"buckets": [(W, H), …] or None, "max_device_memory": float or None}. The CLI calls it before anything
    loads; load_backend again for the Python API."""
    if (buckets is not None or max_device_memory is not None) and backend != "ort-cuda":
        raise UserError(f"--buckets and --max-device-memory choose what --backend ort-cuda keeps on the GPU; "
                        f"{backend} takes neither")
    if max_device_memory is not None and (isinstance(max_device_memory, bool) or
                                          not isinstance(max_device_memory, (int, float)) or
                                          not math.isfinite(max_device_memory) or max_device_memory <= 0):
        raise UserError(f"--max-device-memory {max_device_memory!r}: expected a positive number of GiB")
    if isinstance(buckets, str):
        buckets = parse_sizes(buckets, "--buckets")
    elif buckets is not None:
        sizes = []
        for size in buckets:
            if isinstance(size, str):
                sizes.append(parse_size(size, "--buckets"))
            elif (isinstance(size, (tuple, list)) and len(size) == 2 and
                  all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
                check_size(*size, f"--buckets {size[0]}x{size[1]}")
                sizes.append(tuple(size))
            else:
                raise UserError(f"--buckets {size!r}: expected WIDTHxHEIGHT or (width, height)")
        buckets = sizes
    return {"buckets": buckets, "max_device_memory": None if max_device_memory is None else float(max_device_memory)}


def check_size(width: int, height: int, what: str | None = None) -> None:
    what = what or f"size {width}x{height}"
    if width <= 0 or height <= 0 or width % VAE_FACTOR or height % VAE_FACTOR:
        raise UserError(f"{what}: width and height must be positive multiples of {VAE_FACTOR}")
    if width * height > MAX_PIXELS:
        raise UserError(f"{what}: larger than the {MAX_PIXELS // 2**20} megapixels this runtime accepts per image "
                        "(SDXL is trained at about 1 megapixel)")


def finite(value: float, flag: str, low: float | None = None, high: float | None = None) -> float:
    """A finite number, within [low, high] where given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{flag} {value!r}: expected a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"between {low:g} and {high:g}" if low is not None and high is not None else \
            f"at least {low:g}" if low is not None else f"at most {high:g}"
        raise UserError(f"{flag} {value!r}: expected a number {span}")
    return value


def positive_int(value: int, flag: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{flag} {value!r}: expected a whole number ≥ 1")
    return value
