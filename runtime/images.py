"""Images in and out: reading user images for img2img, and turning decoded arrays into uint8 / PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_file


def load_image(path: str | Path, flag: str = "--init-image", mode: str = "RGB"):
    """A user's image file as a PIL image in `mode`, or a one-line UserError saying why not."""
    return open_image(path, f"{flag} {str(path)!r}", mode)


def open_image(source, what: str, mode: str = "RGB", unreadable: str = "not a readable image"):
    """An image from a path or a binary file object (a request's decoded bytes) as a PIL image in `mode`, or a
    one-line UserError led by `what` (the flag and its value, or the request's field; `unreadable` says what the
    source is not when PIL cannot read it). Images of more pixels than
    PIL's decompression-bomb limit (a few kilobytes of PNG can claim gigabytes) are refused, not opened."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.load()
            return image.convert(mode)
    except FileNotFoundError:
        raise UserError(f"{what}: no such file") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{what}: too many pixels to open ({str(e).split('. ')[0]})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{what}: {unreadable} ({str(e).splitlines()[0][:120]})") from None


def to_model_input(image, width: int, height: int) -> np.ndarray:
    """PIL image → [1,3,H,W] float32 in [-1,1], resized with Lanczos when its size differs (as diffusers'
    VaeImageProcessor with its defaults)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array * 2.0 - 1.0).transpose(2, 0, 1)[None]


def mask_to_array(mask, width: int, height: int) -> np.ndarray:
    """Mask image → [1,1,H,W] of 0/1 (white = repaint), as diffusers' inpainting mask processor: grey scale, Lanczos
    resize when needed, threshold at one half."""
    from PIL import Image

    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return (array >= 0.5).astype(np.float32)[None, None]


def default_size(image, factor: int) -> tuple[int, int]:
    """(width, height) of an input image rounded down to the VAE's factor, as diffusers does."""
    return tuple(x - x % factor for x in image.size)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N,H,W,3] in [0,1] → uint8, rounding as diffusers' numpy_to_pil."""
    return (images * 255).round().astype(np.uint8)


def to_pil(pixels: np.ndarray) -> list:
    """uint8 [N,H,W,3] → PIL images."""
    from PIL import Image

    return [Image.fromarray(image) for image in pixels]


def write_png(path: Path, image, record: dict) -> None:
    """Save a PIL image as PNG, atomically, with what made it: metadata.generation_record's JSON and its
    AUTOMATIC1111 text (metadata.py)."""
    from .metadata import png_info

    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(record))


def png_bytes(image, record: dict) -> bytes:
    """The PNG file write_png writes, in memory (the server's answers)."""
    import io

    from .metadata import png_info

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(record))
    return buffer.getvalue()
