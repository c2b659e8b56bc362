"""Constructing the SDXL torch modules from diffusers-style config folders (weights are filled in by the caller)."""

from __future__ import annotations

from pathlib import Path

# contract name → the subfolder of a diffusers SDXL folder that holds it
SUBFOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "unet": "unet", "vae": "vae"}


def build(component: str, config_dir: Path, *, in_channels: int | None = None):
    """A freshly initialised module for `component` from `config_dir/<subfolder>/config.json`, built on the current
    default device and dtype (callers wrap this in `torch.device(...)` or accelerate's `init_empty_weights()`)."""
    sub = Path(config_dir) / SUBFOLDERS[component]
    if component in ("clip_l", "clip_g"):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModel if component == "clip_l" else CLIPTextModelWithProjection
        return cls(CLIPTextConfig.from_pretrained(sub, local_files_only=True))
    if component == "unet":
        from diffusers import UNet2DConditionModel

        config = UNet2DConditionModel.load_config(sub, local_files_only=True)
        if in_channels is not None:
            config["in_channels"] = in_channels
        return UNet2DConditionModel.from_config(config)
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(AutoencoderKL.load_config(sub, local_files_only=True))
