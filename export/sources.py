"""Where SDXL weights come from: the `--model SRC` of every command.

SRC is one of
  - a diffusers folder (base, refiner or 9-channel inpainting; which one is read from its configs),
  - a single-file `.safetensors` checkpoint in Stability's original layout,
  - `random:base` / `random:refiner`: the official architectures at full size with random weights,
  - `tiny:base` / `tiny:refiner`: the same topology at tiny widths, deterministic, for tests and the demo.

`resolve()` checks SRC cheaply (configs and file headers only) so that a bad value fails at once with one
line; `load_model()` then builds the torch modules. Pickle checkpoints (.ckpt, .pt, .bin) run code when
loaded: they are refused unless the caller passes `allow_pickle=True` (`--allow-pickle`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.errors import UserError
from ..runtime.fileio import read_json
from .vocab import CONFIGS

ACCEPTED = ("a diffusers SDXL folder, a single-file SDXL .safetensors checkpoint, "
            "random:base, random:refiner, tiny:base or tiny:refiner")
BUILTIN_SIZES = {"random": "sdxl", "tiny": "tiny"}  # spec prefix → embedded config family
ROLES = ("base", "refiner")
COMPONENTS = ("clip_l", "clip_g", "unet", "vae")  # the torch modules of an SDXL model, by contract name
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The number of SDXL micro-conditioning values a UNet was trained with tells base from refiner:
# base: original size (2) + crop top-left (2) + target size (2); refiner: original size, crop, aesthetic score.
TIME_IDS = {6: "base", 5: "refiner"}


@dataclass(frozen=True)
class SourceSpec:
    """What `--model SRC` names, found without loading any weights."""

    spec: str  # as the user wrote it
    kind: str  # "diffusers" | "single-file" | "random" | "tiny"
    role: str  # "base" | "refiner"
    architecture: str | None  # embedded config name ("sdxl-base", "tiny-refiner", …); None for a diffusers folder
    path: Path | None = None
    pickle: bool = False
    in_channels: int = 4  # 9 for inpainting UNets

    @property
    def config_dir(self) -> Path | None:
        return CONFIGS / self.architecture if self.architecture else None


@dataclass
class ModelSource:
    """SDXL weights as torch modules, with the configs and tokenizer files that go with them."""

    spec: SourceSpec
    clip_l: Any | None  # transformers CLIPTextModel; None for a refiner
    clip_g: Any | None  # transformers CLIPTextModelWithProjection
    unet: Any | None  # diffusers UNet2DConditionModel
    vae: Any | None  # diffusers AutoencoderKL
    # (a component left out through load_model(components=…) is None)
    scheduler_config: dict
    pipeline_config: dict  # model_index.json: force_zeros_for_empty_prompt, requires_aesthetics_score, …
    tokenizer_dirs: dict[str, Path] = field(default_factory=dict)  # "tokenizer" (CLIP-L), "tokenizer_2" (CLIP-G)

    @classmethod
    def assemble(cls, spec: SourceSpec, modules: dict, config_dir: Path, tokenizer_dirs: dict[str, Path]) -> ModelSource:
        """A ModelSource from loaded modules and the folder that holds the model's scheduler and pipeline configs."""
        return cls(spec=spec, clip_l=modules.get("clip_l"), clip_g=modules.get("clip_g"), unet=modules.get("unet"),
                   vae=modules.get("vae"),
                   scheduler_config=read_json(config_dir / "scheduler" / "scheduler_config.json", spec.spec),
                   pipeline_config=read_json(config_dir / "model_index.json", spec.spec),
                   tokenizer_dirs=tokenizer_dirs)

    @property
    def role(self) -> str:
        return self.spec.role

    def modules(self) -> dict[str, Any]:
        """The loaded torch modules under their contract names (no clip_l for a refiner)."""
        named = {"clip_l": self.clip_l, "clip_g": self.clip_g, "unet": self.unet, "vae": self.vae}
        return {k: v for k, v in named.items() if v is not None}

    def save_pretrained(self, dest: str | Path) -> None:
        """Write a diffusers folder (safetensors weights), readable by diffusers and by `load_model`."""
        from .diffusers_folder import save_folder

        save_folder(self, Path(dest))


def resolve(spec: str, *, allow_pickle: bool = False, flag: str = "--model") -> SourceSpec:
    """Check a `--model` value (or `flag`'s: --refiner, --vae) without loading weights; raise UserError naming it and
    what is accepted."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{flag} is empty; accepted: {ACCEPTED}")
    size, _, role = spec.partition(":")
    if size in BUILTIN_SIZES and role:
        if role not in ROLES:
            raise UserError(f"{flag} {spec!r}: unknown built-in model; accepted: {ACCEPTED}")
        return SourceSpec(spec, size, role, f"{BUILTIN_SIZES[size]}-{role}")
    path = Path(spec).expanduser()
    if not path.exists():
        hint = "" if ":" not in spec else " (built-in models are random:base, random:refiner, tiny:base, tiny:refiner)"
        raise UserError(f"{flag} {spec!r}: no such file or folder{hint}; accepted: {ACCEPTED}")
    if path.is_dir():
        from .diffusers_folder import inspect_folder

        return inspect_folder(spec, path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from .single_file import inspect_checkpoint

        return inspect_checkpoint(spec, path)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(f"{flag} {spec!r} is a pickle checkpoint, which can run arbitrary code when loaded; "
                            "convert it to .safetensors or pass --allow-pickle if you trust it")
        from .single_file import inspect_checkpoint

        return inspect_checkpoint(spec, path, pickle=True)
    raise UserError(f"{flag} {spec!r}: not a model file (expected .safetensors); accepted: {ACCEPTED}")


def load_model(spec: str | SourceSpec, *, dtype=None, device: str = "cpu", allow_pickle: bool = False,
               components: Iterable[str] | None = None, progress: bool = True) -> ModelSource:
    """Load SDXL weights from `spec` (see the module doc) as torch modules in `dtype` (default fp32) on `device`.

    `components` limits loading to some of clip_l, clip_g, unet, vae (the others stay None). Every module is
    built once, where and in the precision it will live: no fp32 copy of a half-precision model, no CPU copy
    of a GPU model.
    """
    import torch

    dtype = dtype or torch.float32
    src = spec if isinstance(spec, SourceSpec) else resolve(spec, allow_pickle=allow_pickle)
    names = [c for c in COMPONENTS if c != "clip_l" or src.role == "base"]
    if components is not None:
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise UserError(f"unknown component {unknown[0]!r}; known: {', '.join(COMPONENTS)}")
        names = [c for c in names if c in set(components)]
    kwargs = dict(dtype=dtype, device=device, names=names, progress=progress)
    if src.kind in BUILTIN_SIZES:
        from .builtin import load_builtin

        model = load_builtin(src, **kwargs)
    elif src.kind == "diffusers":
        from .diffusers_folder import load_folder

        model = load_folder(src, allow_pickle=allow_pickle, **kwargs)
    else:
        from .single_file import load_checkpoint

        model = load_checkpoint(src, **kwargs)
    for module in model.modules().values():
        module.eval().requires_grad_(False)
    return model


def role_from_configs(unet_config: dict, clip_g_config: dict, what: str) -> str:
    """base or refiner, from the number of micro-conditioning values the UNet's added embedding takes."""
    if unet_config.get("addition_embed_type") != "text_time":
        raise UserError(f"{what}: its UNet has no SDXL text_time conditioning: not an SDXL model; accepted: {ACCEPTED}")
    try:
        pooled = int(clip_g_config["projection_dim"])
        n = (int(unet_config["projection_class_embeddings_input_dim"]) - pooled) / int(unet_config["addition_time_embed_dim"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise UserError(f"{what}: its UNet and text_encoder_2 configs lack the SDXL sizes; accepted: {ACCEPTED}") from None
    if n not in TIME_IDS:
        raise UserError(f"{what}: its UNet takes {n:g} micro-conditioning values (SDXL base: 6, refiner: 5); "
                        f"accepted: {ACCEPTED}")
    return TIME_IDS[int(n)]
