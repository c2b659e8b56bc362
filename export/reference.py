"""The diffusers reference pipeline, assembled from a `ModelSource`: what our runtime is held to in parity tests."""

from __future__ import annotations

from .sources import ModelSource


def diffusers_pipeline(model: ModelSource, scheduler=None):
    """`StableDiffusionXLPipeline` for a base, `StableDiffusionXLImg2ImgPipeline` for a refiner, with the model's own
    scheduler config (Euler, leading spacing for SDXL 1.0) unless `scheduler` is given."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tokenizers = {name: CLIPTokenizer.from_pretrained(path, local_files_only=True)
                  for name, path in model.tokenizer_dirs.items()}
    if scheduler is None:
        scheduler = EulerDiscreteScheduler.from_config(model.scheduler_config)
    common = dict(vae=model.vae, text_encoder=model.clip_l, text_encoder_2=model.clip_g,
                  tokenizer=tokenizers.get("tokenizer"), tokenizer_2=tokenizers["tokenizer_2"], unet=model.unet,
                  scheduler=scheduler, add_watermarker=False,
                  force_zeros_for_empty_prompt=bool(model.pipeline_config.get("force_zeros_for_empty_prompt", True)))
    if model.role == "refiner":
        return StableDiffusionXLImg2ImgPipeline(
            requires_aesthetics_score=bool(model.pipeline_config.get("requires_aesthetics_score", False)), **common)
    return StableDiffusionXLPipeline(**common)
