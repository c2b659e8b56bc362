"""ControlNet at run time, as diffusers' StableDiffusionXLControlNetPipeline (and its Img2Img variant) do it.

Each ControlNet of the engine directory (`controlnet_0`, … in the export's order) gets its control image, resized
to the output size with Lanczos and scaled to [0, 1] (diffusers' control image processor), a conditioning scale
and a guidance window [start, end] as fractions of the loop's steps. At step j of n, a net whose window does not
hold the step is left out (diffusers multiplies its residuals by 0); the others' residuals are summed and fed to
`unet_control`. Guess mode: the nets see only the prompt's half of the guidance batch (the negative half gets zero
residuals) and their residuals are ramped from 0.1 × scale (the first) to 1 × scale (the mid block), as diffusers'
ControlNetModel does; a net exported with `global_pool_conditions` forces it, as in diffusers.

The exported ControlNet takes one scale per residual (`conditioning_scale`, export/models/controlnet.py): that
vector carries the user's scale, the guess-mode ramp or both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .contracts import output_shapes
from .errors import UserError
from .validate import CONTROL_SCALE_RANGE, finite, spelled


@dataclass
class Control:
    nets: list[str]  # the engine directory's component names, in order
    images: list[np.ndarray]  # per net: [N, 3, H, W] float32 in [0, 1], N = the call's images
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool
    residuals: int  # the scale vector's length: the nets' outputs
    steps: int = 0  # the loop's steps and its first step, as diffusers counts the window (set by the pipeline)
    first: int = 0

    def scale_vector(self, k: int, step: int) -> np.ndarray:
        """Net k's per-residual scales at schedule step `step` (zeros outside its window)."""
        j, n = step - self.first, self.steps
        keep = 0.0 if (j / n < self.starts[k] or (j + 1) / n > self.ends[k]) else 1.0
        scale = np.float32(self.scales[k] * keep)
        if self.guess_mode:
            return (np.logspace(-1, 0, self.residuals).astype(np.float32) * scale).astype(np.float32)
        return np.full(self.residuals, scale, np.float32)

    def active(self, step: int) -> list[int]:
        """The nets that run at this step (a zero scale vector adds nothing: skipped)."""
        return [k for k in range(len(self.nets)) if self.scale_vector(k, step).any()]


def per_net(value, count: int, flag: str, names: dict | None, parse) -> list:
    """One value for every net, or a list with one per net."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise UserError(f"{spelled(flag, names)}: {len(values)} given for {count} ControlNet"
                        f"{'s' if count != 1 else ''}; give one, or one per ControlNet")
    return [parse(v) for v in values]


def prepare_control(pipeline: dict, components: dict, control_image, conditioning_scale, start, end,
                    guess_mode, width: int, height: int, images: int, names: dict | None = None) -> Control | None:
    """The call's Control (None without control images), every argument checked. `pipeline`: the manifest's base
    pipeline; `components`: the manifest's components (contracts)."""
    from .pipeline import as_image

    nets = list(pipeline.get("controlnets", []))
    flag = spelled("control_image", names)
    if control_image is None:
        given = [f for f, v in (("controlnet_conditioning_scale", conditioning_scale), ("guess_mode", guess_mode),
                                ("control_guidance_start", start), ("control_guidance_end", end))
                 if v not in (None, False)]
        if given:
            raise UserError(f"{spelled(given[0], names)} goes with {flag} (the ControlNets' images)")
        return None
    if not nets:
        raise UserError(f"{flag}: this engine directory has no ControlNet; export one with `sdxl-trt export --model "
                        "SRC --controlnet CONTROLNET --out DIR`")
    given = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(given) != len(nets):
        raise UserError(f"{flag}: {len(given)} image{'s' if len(given) != 1 else ''} for {len(nets)} ControlNet"
                        f"{'s' if len(nets) != 1 else ''} (the directory's {', '.join(nets)}); give one per "
                        "ControlNet, in that order")
    pictures = [as_image(image, f"{flag} {k + 1}" if len(nets) > 1 else flag, "RGB") for k, image in enumerate(given)]
    scales = per_net(1.0 if conditioning_scale is None else conditioning_scale, len(nets),
                     "controlnet_conditioning_scale", names,
                     lambda v: finite(v, "controlnet_conditioning_scale", *CONTROL_SCALE_RANGE, names=names))
    starts = per_net(0.0 if start is None else start, len(nets), "control_guidance_start", names,
                     lambda v: finite(v, "control_guidance_start", 0.0, 1.0, names))
    ends = per_net(1.0 if end is None else end, len(nets), "control_guidance_end", names,
                   lambda v: finite(v, "control_guidance_end", 0.0, 1.0, names))
    for s, e in zip(starts, ends):
        if s >= e:
            raise UserError(f"{spelled('control_guidance_start', names)} {s:g} must be below "
                            f"{spelled('control_guidance_end', names)} {e:g}")
    if not isinstance(guess_mode, (bool, np.bool_)) and guess_mode is not None:
        raise UserError(f"{spelled('guess_mode', names)}: expected true or false, got {guess_mode!r}")
    pooled = bool(components[nets[0]].get("global_pool_conditions", False))  # diffusers reads the first net's
    residuals = len(components[nets[0]]["outputs"])
    arrays = [np.repeat(control_pixels(p, width, height), images, axis=0) for p in pictures]
    return Control(nets, arrays, scales, starts, ends, bool(guess_mode) or pooled, residuals)


def control_pixels(image, width: int, height: int) -> np.ndarray:
    """diffusers' control image processor: RGB, resized to the output size with Lanczos, [1, 3, H, W] in [0, 1]."""
    from PIL import Image

    image = image.convert("RGB").resize((width, height), resample=Image.LANCZOS)
    return (np.asarray(image, np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def control_residuals(backend, control: Control, step: int, x: np.ndarray, t: np.ndarray, cond: Sequence[np.ndarray],
                      guidance: bool, entry: dict) -> dict[str, np.ndarray]:
    """The summed residuals of the nets active at `step`, for the UNet's scaled batch `x` ([negative; prompt] under
    guidance; guess mode with guidance runs the nets on the prompt half alone). `entry`: the first net's manifest
    component (its contract gives the residuals' shapes when no net is active)."""
    embeds, pooled, time_ids = cond
    half = guidance and control.guess_mode
    n = x.shape[0] // 2 if guidance else x.shape[0]  # images
    rows = slice(n, None) if half else slice(None)
    total: dict[str, np.ndarray] = {}
    feeds = dict(sample=x[rows], timestep=t[rows], encoder_hidden_states=embeds[rows], text_embeds=pooled[rows],
                 time_ids=time_ids[rows])
    for k in control.active(step):
        image = control.images[k]
        image = np.concatenate([image, image]) if guidance and not half else image
        out = backend.session(control.nets[k]).run(conditioning_scale=control.scale_vector(k, step),
                                                   controlnet_cond=image, **feeds)
        for name, value in out.items():
            value = value.astype(np.float32)
            total[name] = total[name] + value if name in total else value
    if not total:  # no net active: zero residuals (the UNet adds nothing)
        shapes = {name: value.shape for name, value in feeds.items()}
        shapes.update(controlnet_cond=(feeds["sample"].shape[0], *control.images[0].shape[1:]),
                      conditioning_scale=(control.residuals,))
        total = {name: np.zeros(shape, np.float32) for name, shape in output_shapes(entry, shapes).items()}
    if half:  # the negative half's residuals are zero
        total = {name: np.concatenate([np.zeros_like(value), value]) for name, value in total.items()}
    return total
