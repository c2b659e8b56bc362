"""Checks on what users type, shared by the CLI and the Python API: each failure is a one-line UserError."""

from __future__ import annotations

import re

from .errors import UserError

# SDXL's VAE maps 8×8 pixels to one latent: image sides must be multiples of 8.
VAE_FACTOR = 8


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'WxH' → (width, height), both positive multiples of 8."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"{flag} {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024")
    w, h = int(m.group(1)), int(m.group(2))
    check_size(w, h, f"{flag} {text!r}")
    return w, h


def check_size(width: int, height: int, what: str | None = None) -> None:
    if width <= 0 or height <= 0 or width % VAE_FACTOR or height % VAE_FACTOR:
        raise UserError(f"{what or f'size {width}x{height}'}: width and height must be positive multiples of {VAE_FACTOR}")


def positive_int(value: int, flag: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{flag} {value!r}: expected a whole number ≥ 1")
    return value
