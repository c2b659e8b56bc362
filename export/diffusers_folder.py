"""Diffusers SDXL folders: `model_index.json` plus one subfolder per component, read and written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from ..runtime.errors import UserError
from ..runtime.fileio import atomic_dir, read_json
from .modules import SUBFOLDERS
from .sources import ACCEPTED, ModelSource, SourceSpec, role_from_configs
from .vocab import TOKENIZER_NAMES

WEIGHT_STEMS = {"text_encoder": "model", "text_encoder_2": "model", "unet": "diffusion_pytorch_model",
                "vae": "diffusion_pytorch_model"}


def inspect_folder(spec: str, path: Path) -> SourceSpec:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        if (path / "manifest.json").is_file():
            raise UserError(f"--model {spec!r} is an sdxl-trt engine directory; --model takes the weights it was "
                            f"exported from: {ACCEPTED}")
        raise UserError(f"--model {spec!r} is a folder without model_index.json, not a diffusers model folder; "
                        f"accepted: {ACCEPTED}")
    index = read_json(index_file, f"--model {spec!r}")
    cls = str(index.get("_class_name", ""))
    if not cls.startswith("StableDiffusionXL"):
        raise UserError(f"--model {spec!r} holds a {cls or 'unnamed'} pipeline, not SDXL; accepted: {ACCEPTED}")
    unet_config = read_json(path / "unet" / "config.json", f"--model {spec!r}")
    role = role_from_configs(unet_config, read_json(path / "text_encoder_2" / "config.json", f"--model {spec!r}"),
                             f"--model {spec!r}")
    needed = ["scheduler", "text_encoder_2", "tokenizer_2", "unet", "vae"]
    if role == "base":
        needed += ["text_encoder", "tokenizer"]
    missing = [n for n in needed if not (path / n).is_dir()]
    if missing:
        raise UserError(f"--model {spec!r}: an SDXL {role} folder needs the subfolders {', '.join(needed)}; "
                        f"missing: {', '.join(missing)}")
    pickles = [n for n in needed if n in WEIGHT_STEMS and _weights(path / n, n)[1]]
    return SourceSpec(spec, "diffusers", role, None, path=path, pickle=bool(pickles),
                      in_channels=int(unet_config.get("in_channels", 4)))


def _weights(folder: Path, sub: str) -> tuple[str | None, bool]:
    """(variant, is_pickle) of the weights to load from a component folder, preferring full-precision safetensors."""
    stem = WEIGHT_STEMS[sub]
    for variant in (None, "fp16"):
        name = stem + (f".{variant}" if variant else "")
        if (folder / f"{name}.safetensors").is_file() or (folder / f"{name}.safetensors.index.json").is_file():
            return variant, False
    for variant in (None, "fp16"):
        name = stem + (f".{variant}" if variant else "")
        if (folder / f"{name}.bin").is_file() or (folder / f"{name}.bin.index.json").is_file():
            return variant, True
    raise UserError(f"{folder}: no {stem}.safetensors (or .fp16.safetensors) weights in this folder")


def load_folder(src: SourceSpec, *, dtype, device, names: list[str], progress: bool = True,
                allow_pickle: bool = False) -> ModelSource:
    if src.pickle and not allow_pickle:
        raise UserError(f"--model {src.spec!r} holds pickle (.bin) weights, which can run arbitrary code when loaded; "
                        "convert them to safetensors or pass --allow-pickle if you trust them")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = src.path
    classes = {"clip_l": CLIPTextModel, "clip_g": CLIPTextModelWithProjection, "unet": UNet2DConditionModel,
               "vae": AutoencoderKL}
    modules = {}
    for name in tqdm(names, desc=f"loading {path.name}", disable=not progress, leave=False):
        sub = SUBFOLDERS[name]
        variant, is_pickle = _weights(path / sub, sub)
        kwargs = dict(local_files_only=True, variant=variant, use_safetensors=not is_pickle)
        kwargs["torch_dtype" if name in ("unet", "vae") else "dtype"] = dtype
        try:
            modules[name] = classes[name].from_pretrained(path / sub, **kwargs).to(device)
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--model {src.spec!r}: cannot load {sub}/: {first}") from None
    return ModelSource.assemble(src, modules, path, {n: path / n for n in TOKENIZER_NAMES if (path / n).is_dir()})


def save_folder(model: ModelSource, dest: Path) -> None:
    with atomic_dir(dest) as tmp:
        (tmp / "model_index.json").write_text(json.dumps(model.pipeline_config, indent=2) + "\n")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2) + "\n")
        for name, folder in model.tokenizer_dirs.items():
            shutil.copytree(folder, tmp / name)
        for name, module in model.modules().items():
            module.save_pretrained(tmp / SUBFOLDERS[name], safe_serialization=True)
