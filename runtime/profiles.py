"""Optimization profiles: which input shapes an engine is built for, and which profile a request runs on.

A profile is stated in what users choose, pixels and images per call, and turned into each component's input
shape ranges through its contract's symbolic dimensions (see export/contract.py):

  B  images per call; the UNets see twice as many under classifier-free guidance (negatives stacked first);
     the text encoders see images × prompt windows (a long prompt is encoded one 77-token window at a time)
  S  77 × prompt windows
  h, w  latent size = pixels / 8;  H, W  pixel size

Defaults: one profile per SDXL training bucket (about 1024² pixels, W×H) whose sizes are exact (min = opt = max =
the bucket, so TensorRT picks kernels for exactly that shape), plus one `dynamic` range profile for every other
size (512–1536 px, multiples of 64). Each profile takes 1..max_batch images, optimised for one.
Models without a size input (the text encoders) get a single profile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError
from .validate import VAE_FACTOR
from .validate import parse_size

BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
           (1536, 640), (640, 1536))
DYNAMIC = "dynamic"
ANY_SIZE = "any size"  # the one profile of a model without an image-size input
DYNAMIC_PIXELS = (512, 1536)  # default range of the dynamic profile, in pixels along each side
DYNAMIC_STEP = 64
TOKENS = 77
GUIDED = ("unet", "unet_refiner", "unet_control", "controlnet")  # contracts whose batch doubles under guidance
LEVELS = (2, 4, 8)  # the UNet's down-sampled latent sizes (ControlNet residuals): `h/2`, `w/4`, … rounded up
TEXT = ("clip_l", "clip_g")


@dataclass(frozen=True)
class Profile:
    """Pixel sizes (W, H) from `min` to `max` in steps of `step`, `images` per call (min, opt, max) and prompt
    windows (min, opt, max). `exact` profiles take exactly their images and windows (--static)."""

    name: str
    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]
    step: int
    images: tuple[int, int, int]
    windows: tuple[int, int, int]
    exact: bool = False

    @property
    def label(self) -> str:
        """How users name it: `1216x832`, `dynamic 512-1536 px (step 64)`; with its batch range."""
        if self.name == ANY_SIZE:
            size = ANY_SIZE
        elif self.min == self.max:
            size = f"{self.min[0]}x{self.min[1]}"
        else:
            size = f"{self.name} {self.min[0]}x{self.min[1]}-{self.max[0]}x{self.max[1]} px (step {self.step})"
        lo, _, hi = self.images
        images = f"{lo} image" if lo == hi == 1 else (f"{lo} images" if lo == hi else f"{lo}-{hi} images")
        return f"{size}, {images}" + (", exact" if self.exact else "")

    def batch(self, contract: str) -> tuple[int, int, int]:
        lo, opt, hi = self.images
        if contract in GUIDED:  # n without guidance, 2n with it
            return (2 * lo if self.exact else lo, 2 * opt, 2 * hi)
        if contract in TEXT:
            return (lo * self.windows[0], opt * self.windows[1], hi * self.windows[2])
        return (lo, opt, hi)

    def dims(self, contract: str) -> dict[str, tuple[int, int, int]]:
        """Each symbolic dimension's (min, opt, max) for a component."""
        (w0, h0), (w1, h1), (w2, h2) = self.min, self.opt, self.max
        f = VAE_FACTOR
        dims = {"B": self.batch(contract), "S": tuple(TOKENS * k for k in self.windows),
                "H": (h0, h1, h2), "W": (w0, w1, w2), "h": (h0 // f, h1 // f, h2 // f), "w": (w0 // f, w1 // f, w2 // f)}
        for k in LEVELS:
            for side in ("h", "w"):
                dims[f"{side}/{k}"] = tuple(-(-x // k) for x in dims[side])
        return dims

    def steps(self) -> dict[str, int]:
        latent = self.step // VAE_FACTOR
        steps = {"H": self.step, "W": self.step, "h": latent, "w": latent}
        for k in LEVELS:
            steps[f"h/{k}"] = steps[f"w/{k}"] = max(1, latent // k)
        return steps

    def to_json(self) -> dict:
        return {"name": self.name, "label": self.label, "pixels": {"min": list(self.min), "opt": list(self.opt),
                "max": list(self.max), "step": self.step}, "images": list(self.images), "windows": list(self.windows),
                "exact": self.exact}


def bucket(width: int, height: int, max_batch: int, max_windows: int) -> Profile:
    return Profile(f"{width}x{height}", (width, height), (width, height), (width, height), VAE_FACTOR,
                   (1, 1, max_batch), (1, 1, max_windows))


def dynamic(lo: int, hi: int, max_batch: int, max_windows: int) -> Profile:
    opt = min(max(1024, lo), hi)
    return Profile(DYNAMIC, (lo, lo), (opt, opt), (hi, hi), DYNAMIC_STEP, (1, 1, max_batch), (1, 1, max_windows))


def parse_profiles(spec: str | None, static: str | None, max_batch: int, max_windows: int,
                   pixel_bounds: tuple[int, int] = (256, 2048)) -> list[Profile]:
    """`--profiles` (comma-separated `WxH` buckets and `dynamic` or `dynamic:LO-HI`; default: every SDXL bucket and
    `dynamic`) or `--static WxH` (one exact shape: max_batch images under guidance, one prompt window)."""
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be at least 1")
    lo_px, hi_px = pixel_bounds

    def in_bounds(width: int, height: int, what: str) -> None:
        if not (lo_px <= width <= hi_px and lo_px <= height <= hi_px):
            raise UserError(f"{what}: {width}x{height} is outside what the models were exported for "
                            f"({lo_px}-{hi_px} px per side)")

    if static is not None:
        if spec is not None:
            raise UserError("--static and --profiles exclude each other: --static builds one exact shape")
        width, height = parse_size(static, "--static")
        in_bounds(width, height, "--static")
        return [Profile(f"{width}x{height}", (width, height), (width, height), (width, height), VAE_FACTOR,
                        (max_batch,) * 3, (1, 1, 1), exact=True)]
    if spec is None:
        return [bucket(w, h, max_batch, max_windows) for w, h in BUCKETS] + [dynamic(*DYNAMIC_PIXELS, max_batch,
                                                                                    max_windows)]
    profiles: list[Profile] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"dynamic(?::(\d+)-(\d+))?", item)
        if m:
            lo, hi = (int(m[1]), int(m[2])) if m[1] else DYNAMIC_PIXELS
            if lo % DYNAMIC_STEP or hi % DYNAMIC_STEP or not 0 < lo <= hi:
                raise UserError(f"--profiles {item!r}: the dynamic range needs LO ≤ HI, multiples of {DYNAMIC_STEP}")
            in_bounds(lo, lo, f"--profiles {item!r}")
            in_bounds(hi, hi, f"--profiles {item!r}")
            profile = dynamic(lo, hi, max_batch, max_windows)
        else:
            width, height = parse_size(item, "--profiles")
            in_bounds(width, height, f"--profiles {item!r}")
            profile = bucket(width, height, max_batch, max_windows)
        if any(p.name == profile.name for p in profiles):
            raise UserError(f"--profiles: {profile.name} is named twice")
        profiles.append(profile)
    if not profiles:
        raise UserError("--profiles is empty; give WxH buckets and/or `dynamic`")
    # exact buckets first: a size that has its own profile runs on it, not on the dynamic range
    return sorted(profiles, key=lambda p: p.name == DYNAMIC)


def input_shapes(profile: Profile, contract: str, inputs: list[dict]) -> dict[str, list[list[int]]]:
    """{input name: [min, opt, max]} for one component (`inputs`: its contract's input specs)."""
    dims = profile.dims(contract)
    shapes = {}
    for spec in inputs:
        ranges = [dims[d] if isinstance(d, str) else (d, d, d) for d in spec["shape"]]
        shapes[spec["name"]] = [[r[i] for r in ranges] for i in range(3)]
    return shapes


def input_steps(profile: Profile, inputs: list[dict]) -> dict[str, list[int]]:
    """{input name: the multiple each dimension must be} (1 where any size in range will do)."""
    steps = profile.steps()
    return {spec["name"]: [steps.get(d, TOKENS if d == "S" else 1) if isinstance(d, str) else 1 for d in spec["shape"]]
            for spec in inputs}


def sized(inputs: list[dict]) -> bool:
    """Whether a component has an image-size input (the text encoders do not)."""
    return any(d in ("h", "w", "H", "W") for spec in inputs for d in spec["shape"] if isinstance(d, str))


def shape_fits(shape, lo, hi, step) -> bool:
    return len(shape) == len(lo) and all(a <= s <= b and s % m == 0 for s, a, b, m in zip(shape, lo, hi, step))


def select_profile(profiles: list[dict], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first built profile (engine record entries) whose ranges hold every input shape."""
    for index, profile in enumerate(profiles):
        if all(shape_fits(tuple(shape), profile["shapes"][name][0], profile["shapes"][name][2],
                          profile["steps"][name]) for name, shape in shapes.items()):
            return index
    asked = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
    built = "; ".join(p["label"] for p in profiles)
    raise UserError(f"no optimization profile of this engine takes {asked}; it was built for: {built}. "
                    "Rebuild with `sdxl-trt build DIR --profiles WxH,...` to add the size")
