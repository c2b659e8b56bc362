"""What ran, written into every PNG: our full record as JSON, and the AUTOMATIC1111 text the ecosystem reads.

Two text chunks, because two kinds of reader exist:

- `sdxl-trt`: JSON with every value the pipeline used, defaults resolved (never null), enough for
  `sdxl-trt generate DIR --from-png FILE` to make the same image again.
- `parameters`: AUTOMATIC1111's "infotext", which PNG-info tabs, image sites and other UIs parse:

      a photograph of an astronaut riding a horse
      Negative prompt: blurry
      Steps: 30, Sampler: Euler, CFG scale: 5.0, Seed: 123, Size: 1024x1024, Model hash: 0123456789, …

  the prompt (any number of lines), a `Negative prompt:` line when there is one, then one line of `Key: value`
  pairs joined by ", ", a value holding a comma, colon or newline written as a JSON string (as A1111's `quote`).
  Readers (A1111's `parse_generation_parameters`) take the last line as the settings when it holds at least
  three such pairs.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from .errors import UserError

CHUNK = "sdxl-trt"  # our JSON record
A1111_CHUNK = "parameters"  # the infotext
SCHEMA = "sdxl-trt/1"

# our sampler names → A1111's (its sampler list spells the scheduler into the name for these)
A1111_SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                  "dpmpp_2m_karras": "DPM++ 2M Karras", "dpmpp_sde_karras": "DPM++ SDE Karras", "ddim": "DDIM",
                  "lcm": "LCM", "tcd": "TCD"}


@functools.cache
def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("sdxl-trt")
    except metadata.PackageNotFoundError:
        return "unknown"


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_hash(pipe, role: str) -> str:
    """Ten hex digits naming the weights that ran (A1111 writes the checkpoint's sha256 cut to ten): the sha256 of
    the role's UNet weights, which every export of the same weights shares; the manifest's where it has none."""
    unet = pipe.roles.get(role, {}).get("components", {}).get("unet")
    digest = pipe.manifest.components.get(unet, {}).get("weights_sha256") if unet else None
    return (digest or pipe.manifest.sha256)[:10]


def model_name(pipe, role: str) -> str:
    """The source a role was exported from, as users name it: a file's or folder's stem, or `tiny:base`."""
    spec = pipe.manifest.data.get("sources", {}).get(role, {}).get("spec", "")
    return Path(spec).stem if "/" in spec or spec.endswith((".safetensors", ".ckpt")) else spec


def generation_record(pipe, call: dict, *, prompt: str, negative: str | None, seed: int, size: tuple[int, int],
                      backend: str, loras: list[dict], init_image: dict | None = None,
                      mask: dict | None = None, controls: list[dict] | None = None, guess_mode: bool = False) -> dict:
    """Every value one image was made with, defaults resolved as the pipeline resolves them. `call`: the keyword
    arguments the pipeline was called with (num_inference_steps and sampler required); `size`: the image's (W, H);
    `init_image` / `mask`: {"sha256", and "path" where a file was given} when used; `loras`: what was applied;
    `controls`: per ControlNet {"sha256", "path" where a file was given, "scale", "start", "end"} (control_record)."""
    from .pipeline import (AESTHETIC_SCORE, DEFAULT_GUIDANCE, DEFAULT_STRENGTH, INPAINT_GUIDANCE, INPAINT_STRENGTH,
                           NEGATIVE_AESTHETIC_SCORE)
    from .samplers import SDXL_SCHEDULER

    inpainting = mask is not None
    guidance = call.get("guidance_scale")
    spacing = call.get("spacing") or {**SDXL_SCHEDULER, **pipe.scheduler_config}["timestep_spacing"]
    record = {"schema": SCHEMA, "prompt": prompt, "negative_prompt": negative or "", "seed": int(seed),
              "steps": int(call["num_inference_steps"]), "sampler": call["sampler"], "spacing": spacing,
              "guidance": float(guidance if guidance is not None else
                                INPAINT_GUIDANCE if inpainting else DEFAULT_GUIDANCE),
              "guidance_rescale": float(call.get("guidance_rescale") or 0.0), "size": f"{size[0]}x{size[1]}",
              "long_prompt": call.get("long_prompt") or "truncate"}
    if init_image is not None:
        strength = call.get("strength")
        record.update({f"init_image{'_' + k if k != 'path' else ''}": v for k, v in init_image.items()})
        record["strength"] = float(strength if strength is not None else
                                   INPAINT_STRENGTH if inpainting else DEFAULT_STRENGTH)
    if mask is not None:
        record.update({f"mask{'_' + k if k != 'path' else ''}": v for k, v in mask.items()})
    if controls:
        record.update(controls=controls, guess_mode=bool(guess_mode))
    for key in ("refiner_start", "refine_strength"):
        if call.get(key) is not None:
            record.update({key: float(call[key]), "aesthetic_score": AESTHETIC_SCORE,
                           "negative_aesthetic_score": NEGATIVE_AESTHETIC_SCORE})
    record.update(loras=loras, backend=backend, model=pipe.manifest.data.get("sources", {}),
                  model_name=model_name(pipe, pipe.main_role), model_hash=model_hash(pipe, pipe.main_role),
                  manifest_sha256=pipe.manifest.sha256, version=f"sdxl-trt {_version()}")
    if "refiner_start" in record or "refine_strength" in record:
        record.update(refiner_name=model_name(pipe, "refiner"), refiner_hash=model_hash(pipe, "refiner"))
    return record


def control_record(images: list[dict], scales, starts, ends) -> list[dict] | None:
    """The record's `controls`: each ControlNet's image ({"sha256"[, "path"]}) with its scale and window, a value
    given once applying to every net (as the pipeline reads them)."""
    if not images:
        return None

    def each(value, default):
        values = value if isinstance(value, (list, tuple)) else [default if value is None else value] * len(images)
        return [float(v) for v in values]

    return [{**image, "scale": scale, "start": start, "end": end} for image, scale, start, end in
            zip(images, each(scales, 1.0), each(starts, 0.0), each(ends, 1.0))]


def quote(value) -> str:
    """A value as A1111 writes it on the settings line: as is, or as a JSON string if it holds , : or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def infotext(record: dict) -> str:
    """The record in AUTOMATIC1111's text format: prompt, `Negative prompt: …`, then `Key: value, …` (A1111's own
    keys first, ours after them)."""
    settings = {"Steps": record["steps"], "Sampler": A1111_SAMPLERS.get(record["sampler"], record["sampler"]),
                "CFG scale": record["guidance"], "Seed": record["seed"], "Size": record["size"]}
    if "model_hash" in record:
        settings.update({"Model hash": record["model_hash"], "Model": record["model_name"]})
    if "strength" in record:
        settings["Denoising strength"] = record["strength"]
    if "mask_sha256" in record:
        settings["Inpainting"] = "mask"
    if "refiner_start" in record:
        settings.update({"Refiner": f"{record['refiner_name']} [{record['refiner_hash']}]",
                         "Refiner switch at": record["refiner_start"]})
    if "refine_strength" in record:
        settings.update({"Refiner": f"{record['refiner_name']} [{record['refiner_hash']}]",
                         "Refine strength": record["refine_strength"]})
    settings["Spacing"] = record.get("spacing")
    if record.get("guidance_rescale"):
        settings["Guidance rescale"] = record["guidance_rescale"]
    if record.get("long_prompt") == "chunk":
        settings["Long prompt"] = "chunk"
    if record.get("loras"):
        settings["LoRA"] = "; ".join(f"{a.get('name') or Path(a['file']).stem}: {a['scale']:g}" for a in record["loras"])
    settings["Version"] = record.get("version")
    lines = [record["prompt"]]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def png_info(record: dict):
    """Pillow's PngInfo holding both chunks (iTXt where the text is not Latin-1, as Pillow chooses)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(A1111_CHUNK, infotext(record))
    info.add_text(CHUNK, json.dumps(record, ensure_ascii=False))
    return info


def read_record(path: str | Path, flag: str = "--from-png") -> dict:
    """The JSON record of a PNG written by sdxl-trt, or a one-line UserError saying why there is none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}).get(CHUNK)
    except FileNotFoundError:
        raise UserError(f"{flag} {str(path)!r}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{flag} {str(path)!r}: not a readable image ({e})") from None
    if text is None:
        raise UserError(f"{flag} {str(path)!r}: holds no sdxl-trt parameters (no {CHUNK!r} text chunk); only PNGs "
                        "written by sdxl-trt generate or serve can be run again")
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise UserError(f"{flag} {str(path)!r}: its {CHUNK!r} chunk is not JSON ({e or 'nested too deep'})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise UserError(f"{flag} {str(path)!r}: its {CHUNK!r} chunk is not a {SCHEMA} record")
    for key, (kinds, required) in RECORD_FIELDS.items():
        value = record.get(key)
        if (value is None and required) or (value is not None and (not isinstance(value, kinds)
                                                                   or (isinstance(value, bool) and bool not in kinds))):
            raise UserError(f"{flag} {str(path)!r}: its record's {key!r} is {json.dumps(value)[:60]}; expected "
                            f"{' or '.join(k.__name__ for k in kinds)} (a record edited by hand or from another "
                            "version)")
    if not all(isinstance(a, dict) for a in record.get("loras") or []):
        raise UserError(f"{flag} {str(path)!r}: its record's 'loras' is not a list of adapters")
    return record


# what --from-png reads of a record: key → (accepted types, required); generation_record writes them
RECORD_FIELDS = {
    "prompt": ((str,), True), "negative_prompt": ((str,), False), "seed": ((int,), True), "steps": ((int,), True),
    "sampler": ((str,), True), "spacing": ((str,), False), "guidance": ((int, float), True),
    "guidance_rescale": ((int, float), False), "size": ((str,), True), "long_prompt": ((str,), False),
    "refiner_start": ((int, float), False), "refine_strength": ((int, float), False), "strength": ((int, float), False),
    "init_image": ((str,), False), "mask": ((str,), False), "init_image_sha256": ((str,), False),
    "mask_sha256": ((str,), False), "model_hash": ((str,), True), "loras": ((list,), False),
    "controls": ((list,), False), "guess_mode": ((bool,), False),
}
